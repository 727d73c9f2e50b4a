//! The stamp protocol: how a writer marks a document so the daemon can order and attribute
//! its changes. Any language can follow it:
//!
//! * every document carries a **version** field (default `version`), an Int64 that is `1`
//!   when the document is created and grows by exactly one with every write;
//! * every write is a compare-and-swap: filter `{_id: id, version: v}`, set `version: v + 1`
//!   (a write that matches nothing lost the race: re-read and retry);
//! * every write sets the **origin** field (default `_origin`) to the writer's client id, a
//!   string, so sync clients can recognise their own writes.
//!
//! Documents written without the stamp (by mongosh or another service) are still synced:
//! the daemon assigns versions itself and records the origin as unknown.

use bson::{Bson, Document};

/// Names of the stamp fields. Shared by the thin client and the daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StampFields {
    /// The version field (Int64, `1` on create, `+1` per write).
    pub version_field: String,
    /// The origin field (the writer's client id).
    pub origin_field: String,
}

impl Default for StampFields {
    fn default() -> Self {
        Self {
            version_field: "version".to_owned(),
            origin_field: "_origin".to_owned(),
        }
    }
}

impl StampFields {
    /// Reads the version of a document: an integral Int64, Int32 or Double ≥ 0.
    /// `None` when the field is absent or not a usable version.
    pub fn version_of(&self, doc: &Document) -> Option<i64> {
        match doc.get(&self.version_field)? {
            Bson::Int64(v) if *v >= 0 => Some(*v),
            Bson::Int32(v) if *v >= 0 => Some(i64::from(*v)),
            Bson::Double(v) if *v >= 0.0 && v.fract() == 0.0 && *v < 9.0e15 => Some(*v as i64),
            _ => None,
        }
    }

    /// Reads the origin of a document, if it carries one.
    pub fn origin_of(&self, doc: &Document) -> Option<String> {
        match doc.get(&self.origin_field)? {
            Bson::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Writes the stamp (version and origin) into a document.
    pub fn stamp(&self, doc: &mut Document, version: i64, origin: &str) {
        doc.insert(self.version_field.clone(), Bson::Int64(version));
        doc.insert(self.origin_field.clone(), Bson::String(origin.to_owned()));
    }
}
