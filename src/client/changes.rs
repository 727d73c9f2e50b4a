//! What an edit changed, as MongoDB update operators.
//!
//! [`super::SyncCollection::find_one_and_update`] compares `T`'s serialisation before and
//! after the edit and writes only the difference: `$set` of each changed (or added) field,
//! `$unset` of each removed one, descending into sub-documents present on both sides. A
//! field the edit did not touch is not written, so fields `T` does not model and the
//! stored BSON type of untouched values (an Int32 read into an `i64`) survive.

use bson::{Bson, Document};

/// One changed path: `Some(value)` to set, `None` to remove.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    /// The path, one key per level.
    pub path: Vec<String>,
    /// The new value; `None` when the field was removed.
    pub value: Option<Bson>,
}

/// The changes from `before` to `after`, top-level keys in `skip` left out.
pub(crate) fn changes(before: &Document, after: &Document, skip: &[&str]) -> Vec<Change> {
    let mut out = Vec::new();
    walk(before, after, &mut Vec::new(), skip, &mut out);
    out
}

fn walk(
    before: &Document,
    after: &Document,
    path: &mut Vec<String>,
    skip: &[&str],
    out: &mut Vec<Change>,
) {
    let top = path.is_empty();
    let skipped = |k: &str| top && skip.contains(&k);
    for k in before.keys() {
        if !after.contains_key(k) && !skipped(k) {
            out.push(Change {
                path: child(path, k),
                value: None,
            });
        }
    }
    for (k, new) in after {
        if skipped(k) {
            continue;
        }
        match (before.get(k), new) {
            (Some(old), new) if same(old, new) => {}
            // Descend only where every key can be named in a dotted path.
            (Some(Bson::Document(old)), Bson::Document(new))
                if old.keys().chain(new.keys()).all(|k| path_safe(k)) =>
            {
                path.push(k.clone());
                walk(old, new, path, skip, out);
                path.pop();
            }
            _ => out.push(Change {
                path: child(path, k),
                value: Some(new.clone()),
            }),
        }
    }
}

fn child(path: &[String], k: &str) -> Vec<String> {
    let mut p = path.to_vec();
    p.push(k.to_owned());
    p
}

/// Whether a key can be one segment of a dotted update path.
pub(crate) fn path_safe(k: &str) -> bool {
    !k.is_empty() && !k.contains('.') && !k.starts_with('$')
}

/// Equality that also sees key order and the bits of doubles (NaN equals NaN, -0.0 is not
/// 0.0), so that only real changes are written.
pub(crate) fn same(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Double(x), Bson::Double(y)) => x.to_bits() == y.to_bits(),
        (Bson::Document(x), Bson::Document(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        (Bson::Array(x), Bson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

/// The update document (`$set`/`$unset`) of `changes`, or `None` when a top-level key cannot
/// be named in an update path (it contains `.` or starts with `$`): the caller then
/// replaces the document with [`apply`] of the changes.
pub(crate) fn to_update(changes: &[Change]) -> Option<(Document, Document)> {
    let mut set = Document::new();
    let mut unset = Document::new();
    for c in changes {
        if !c.path.iter().all(|k| path_safe(k)) {
            return None;
        }
        let dotted = c.path.join(".");
        match &c.value {
            Some(v) => {
                set.insert(dotted, v.clone());
            }
            None => {
                unset.insert(dotted, "");
            }
        }
    }
    Some((set, unset))
}

/// `doc` with `changes` applied (an existing key keeps its place).
pub(crate) fn apply(doc: &Document, changes: &[Change]) -> Document {
    let mut out = doc.clone();
    for c in changes {
        set_path(&mut out, &c.path, c.value.as_ref());
    }
    out
}

fn set_path(doc: &mut Document, path: &[String], value: Option<&Bson>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match value {
            Some(v) => {
                doc.insert(first.clone(), v.clone());
            }
            None => {
                doc.remove(first);
            }
        }
        return;
    }
    if !matches!(doc.get(first), Some(Bson::Document(_))) {
        if value.is_none() {
            return;
        }
        doc.insert(first.clone(), Document::new());
    }
    if let Some(Bson::Document(d)) = doc.get_mut(first) {
        set_path(d, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn only_what_changed_is_written() {
        let before = doc! {
            "_id": 1, "version": 3_i64, "a": 1_i64, "b": "x",
            "nested": { "k": 1, "drop": true, "deep": { "z": 1 } },
            "odd": { "a.b": 1 }, "arr": [1, 2],
        };
        let after = doc! {
            "_id": 1, "version": 9_i64, "a": 1_i64, "b": "y",
            "nested": { "k": 1, "deep": { "z": 2 }, "new": 5 },
            "odd": { "a.b": 2 }, "arr": [1, 2, 3], "added": 1.5,
        };
        let ch = changes(&before, &after, &["_id", "version"]);
        let (set, unset) = to_update(&ch).unwrap();
        assert_eq!(
            set,
            doc! {
                "b": "y", "nested.deep.z": 2, "nested.new": 5,
                "odd": { "a.b": 2 }, "arr": [1, 2, 3], "added": 1.5,
            }
        );
        assert_eq!(unset, doc! { "nested.drop": "" });
        // Applying the changes to the stored document keeps what the edit did not touch.
        let stored = doc! { "_id": 1, "version": 3_i64, "a": 1_i32, "b": "x", "other": "keep",
        "nested": { "k": 1, "drop": true, "deep": { "z": 1 }, "theirs": 0 }, "odd": { "a.b": 1 }, "arr": [1, 2] };
        let merged = apply(&stored, &ch);
        assert_eq!(merged.get("a"), Some(&Bson::Int32(1)));
        assert_eq!(merged.get_str("other").unwrap(), "keep");
        assert_eq!(
            merged.get_document("nested").unwrap(),
            &doc! { "k": 1, "deep": { "z": 2 }, "theirs": 0, "new": 5 }
        );
    }

    #[test]
    fn unnameable_top_level_keys_fall_back_to_replacing() {
        let before = doc! { "$x": 1 };
        let after = doc! { "$x": 2 };
        assert!(to_update(&changes(&before, &after, &[])).is_none());
        assert!(changes(&doc! { "f": f64::NAN }, &doc! { "f": f64::NAN }, &[]).is_empty());
        assert_eq!(
            changes(&doc! { "f": 0.0 }, &doc! { "f": -0.0 }, &[]).len(),
            1
        );
        // Reordering alone writes nothing (no update operator can express it).
        assert!(changes(
            &doc! { "d": { "a": 1, "b": 2 } },
            &doc! { "d": { "b": 2, "a": 1 } },
            &[]
        )
        .is_empty());
    }
}
