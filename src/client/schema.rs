//! Finds the field names of a `Deserialize` struct without an instance of it, so that a
//! type lacking the version field is rejected when the client is built.

use serde::de::{self, Deserialize, Deserializer, Visitor};

#[derive(Debug)]
struct Probe(Option<&'static [&'static str]>);

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field probe")
    }
}
impl std::error::Error for Probe {}
impl de::Error for Probe {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Probe(None)
    }
}

struct FieldProbe;

impl<'de> Deserializer<'de> for FieldProbe {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// The field names of `T` when it deserialises as a plain struct; `None` for maps,
/// documents and structs with `#[serde(flatten)]`, whose fields are only known per value.
pub fn struct_fields<'de, T: Deserialize<'de>>() -> Option<&'static [&'static str]> {
    match T::deserialize(FieldProbe) {
        Err(Probe(fields)) => fields,
        Ok(_) => None,
    }
}
