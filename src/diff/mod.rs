//! Type-exact RFC 6902 diffs between BSON documents.
//!
//! [`diff`] computes a JSON Patch from one document to another and [`apply`] applies one;
//! both work on the type-preserving representation described in [`repr`], so that
//! `apply(a, diff(a, b)) == b` holds exactly: BSON types (Int32 vs Int64 vs Double,
//! ObjectId, DateTime, Decimal128, Binary, …) and key order included.
//!
//! ```
//! use bson::doc;
//! use eventsync::diff::{apply, diff};
//!
//! let before = doc! { "_id": 1, "gold": 100, "level": 1_i64 };
//! let after = doc! { "_id": 1, "gold": 150, "level": 2_i64 };
//! let patch = diff(&before, &after);
//! assert_eq!(
//!     serde_json::to_string(&patch).unwrap(),
//!     r#"[{"op":"replace","path":"/gold","value":150},{"op":"replace","path":"/level","value":{"$numberLong":"2"}}]"#
//! );
//! assert_eq!(apply(&before, &patch).unwrap(), after);
//! assert!(diff(&after, &after).is_empty());
//! ```

mod apply;
mod compute;
pub mod repr;

pub use apply::{apply, apply_value};
pub use compute::{diff, diff_values};
pub use json_patch::{Patch, PatchOperation};

/// Why a patch could not be computed, applied or decoded.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The JSON is not a valid encoding of a BSON value (see [`repr`]).
    #[error("not a type-preserving BSON encoding: {0}")]
    Representation(String),
    /// A patch operation does not fit the document it is applied to.
    #[error("patch operation {index} ({op}) cannot be applied at {path:?}: {reason}")]
    Apply {
        /// Position of the operation in the patch.
        index: usize,
        /// The operation name (`add`, `remove`, …).
        op: &'static str,
        /// The JSON Pointer of the operation.
        path: String,
        /// What is wrong.
        reason: String,
    },
}
