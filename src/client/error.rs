//! Errors of the thin client.

use crate::diff::DiffError;

/// What went wrong in a thin-client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The document type cannot be versioned.
    #[error(
        "document type `{type_name}` has no field `{field}`: add `{field}: i64` to it (or configure \
         another version field name with `ClientOptions::version_field`)"
    )]
    MissingVersionField {
        /// The Rust type.
        type_name: &'static str,
        /// The configured version field name.
        field: String,
    },
    /// The compare-and-swap kept losing against other writers.
    #[error(
        "write conflict on document {id}: expected version {expected}, found {}, after {attempts} attempts; \
         re-read the document or raise `max_retries`",
        found.map_or_else(|| "no document".to_owned(), |v| v.to_string())
    )]
    Conflict {
        /// The document id (Extended JSON).
        id: String,
        /// The version this client expected to replace.
        expected: i64,
        /// The version found in MongoDB at the last attempt (`None`: document gone).
        found: Option<i64>,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The document does not exist.
    #[error("document {id} not found")]
    NotFound {
        /// The document id (Extended JSON).
        id: String,
    },
    /// A stored document has no usable version field.
    #[error("document {id} has no usable `{field}` field (an Int64 ≥ 0); it was written without the stamp protocol")]
    Unversioned {
        /// The document id (Extended JSON).
        id: String,
        /// The version field name.
        field: String,
    },
    /// The update document is not allowed.
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    /// The value could not be turned into BSON.
    #[error("cannot serialise document: {0}")]
    Serialize(#[from] bson::ser::Error),
    /// A stored document does not fit the Rust type.
    #[error("stored document does not fit the type: {0}")]
    Deserialize(#[from] bson::de::Error),
    /// Diff computation failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// MongoDB reported an error.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
}
