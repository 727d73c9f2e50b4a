//! The type-preserving JSON representation of BSON documents that patches operate on.
//!
//! Plain JSON loses BSON types (an Int64 becomes a number, a Date a string, an ObjectId a
//! string). Patches here therefore operate on a representation in which every BSON value
//! has exactly one JSON form and every JSON form decodes to exactly one BSON value:
//!
//! | BSON                         | JSON                                                    |
//! |------------------------------|---------------------------------------------------------|
//! | Int32                        | integer number: `5`                                     |
//! | Double (finite, not `-0.0`)  | number with a fraction or exponent: `5.0`, `1e300`      |
//! | String, Boolean, Null        | themselves                                              |
//! | Array                        | array                                                   |
//! | Document                     | object; a key starting with `$` is written with one more `$` (`$x` → `$$x`) |
//! | everything else              | canonical Extended JSON v2 wrapper: `{"$numberLong": "5"}`, `{"$oid": "…"}`, `{"$date": {"$numberLong": "…"}}`, `{"$numberDecimal": "…"}`, `{"$binary": {…}}`, … |
//!
//! Because user keys that begin with `$` are escaped, an object whose first key starts
//! with a single `$` is always a wrapper, and decoding is unambiguous. Key order is kept.
//!
//! ```
//! use bson::doc;
//! use eventsync::diff::repr::{from_value, to_value};
//!
//! let d = doc! { "n": 1_i32, "big": 1_i64, "f": 2.0, "$odd": true };
//! let v = to_value(&d);
//! assert_eq!(v.to_string(), r#"{"n":1,"big":{"$numberLong":"1"},"f":2.0,"$$odd":true}"#);
//! assert_eq!(from_value(&v).unwrap(), d);
//! ```

use bson::{Bson, Document};
use serde_json::{Map, Number, Value};

use super::DiffError;

/// Encodes a BSON document in the type-preserving representation.
pub fn to_value(doc: &Document) -> Value {
    Value::Object(encode_doc(doc))
}

/// Encodes any BSON value in the type-preserving representation.
pub fn bson_to_value(value: &Bson) -> Value {
    match value {
        Bson::Document(d) => Value::Object(encode_doc(d)),
        Bson::Array(items) => Value::Array(items.iter().map(bson_to_value).collect()),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Null => Value::Null,
        Bson::Int32(i) => Value::Number(Number::from(*i)),
        Bson::Double(f) if plain_double(*f) => match Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None => value.clone().into_canonical_extjson(),
        },
        other => other.clone().into_canonical_extjson(),
    }
}

fn plain_double(f: f64) -> bool {
    f.is_finite() && !(f == 0.0 && f.is_sign_negative())
}

fn encode_doc(doc: &Document) -> Map<String, Value> {
    let mut map = Map::with_capacity(doc.len());
    for (key, value) in doc {
        map.insert(escape_key(key), bson_to_value(value));
    }
    map
}

/// Escapes a document key for the representation (`$x` → `$$x`).
pub fn escape_key(key: &str) -> String {
    if key.starts_with('$') {
        format!("${key}")
    } else {
        key.to_owned()
    }
}

/// Reverses [`escape_key`].
pub fn unescape_key(key: &str) -> Result<String, DiffError> {
    match key.strip_prefix('$') {
        Some(rest) if rest.starts_with('$') => Ok(rest.to_owned()),
        Some(_) => Err(DiffError::Representation(format!(
            "key {key:?} starts with a single '$' outside an Extended JSON wrapper"
        ))),
        None => Ok(key.to_owned()),
    }
}

/// Encodes a document as type-preserving JSON text (how the daemon stores document states).
pub fn to_text(doc: &Document) -> String {
    to_value(doc).to_string()
}

/// Decodes a document from type-preserving JSON text (the reverse of [`to_text`]).
pub fn from_text(text: &str) -> Result<Document, DiffError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DiffError::Representation(format!("not JSON: {e}")))?;
    from_value(&value)
}

/// Decodes a document from the type-preserving representation.
pub fn from_value(value: &Value) -> Result<Document, DiffError> {
    match value_to_bson(value)? {
        Bson::Document(d) => Ok(d),
        other => Err(DiffError::Representation(format!(
            "expected a document, found {:?}",
            other.element_type()
        ))),
    }
}

/// Decodes any value from the type-preserving representation.
pub fn value_to_bson(value: &Value) -> Result<Bson, DiffError> {
    Ok(match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::String(s) => Bson::String(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Bson::Int32(i32::try_from(i).map_err(|_| {
                    DiffError::Representation(format!(
                        "integer {i} does not fit Int32; Int64 values are written {{\"$numberLong\": \"{i}\"}}"
                    ))
                })?)
            } else if n.is_u64() {
                return Err(DiffError::Representation(format!(
                    "integer {n} does not fit Int32; use {{\"$numberLong\": ...}}"
                )));
            } else {
                Bson::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::Array(items) => Bson::Array(
            items
                .iter()
                .map(value_to_bson)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(map) => {
            let is_wrapper = map
                .keys()
                .next()
                .is_some_and(|k| k.starts_with('$') && !k.starts_with("$$"));
            if is_wrapper {
                match Bson::try_from(value.clone()) {
                    Ok(Bson::Document(_)) | Err(_) => {
                        return Err(DiffError::Representation(format!(
                            "{value} is neither an Extended JSON wrapper nor a document \
                             (user keys starting with '$' are written with '$$')"
                        )))
                    }
                    Ok(other) => other,
                }
            } else {
                let mut doc = Document::new();
                for (key, item) in map {
                    doc.insert(unescape_key(key)?, value_to_bson(item)?);
                }
                Bson::Document(doc)
            }
        }
    })
}
