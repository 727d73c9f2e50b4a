//! Computing a patch: a structural walk that keeps key order exact.

use bson::Document;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::{Map, Value};

use super::repr::to_value;

/// Computes the RFC 6902 patch that turns `from` into `to`, over the type-preserving
/// representation. The patch is empty when the documents are identical (types and key
/// order included).
pub fn diff(from: &Document, to: &Document) -> Patch {
    diff_values(&to_value(from), &to_value(to))
}

/// Computes the patch between two values of the type-preserving representation.
pub fn diff_values(from: &Value, to: &Value) -> Patch {
    let mut ops = Vec::new();
    let mut path = PointerBuf::new();
    walk(&mut path, from, to, &mut ops);
    Patch(ops)
}

/// Equality that also requires object keys in the same order (serde_json's `==` ignores
/// order even with `preserve_order`).
pub(crate) fn exact_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && exact_eq(va, vb))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(va, vb)| exact_eq(va, vb))
        }
        (Value::Number(x), Value::Number(y)) => {
            // 1 and 1.0 are different BSON types (Int32 vs Double).
            x.is_f64() == y.is_f64() && x == y
        }
        _ => a == b,
    }
}

fn is_wrapper(map: &Map<String, Value>) -> bool {
    map.keys()
        .next()
        .is_some_and(|k| k.starts_with('$') && !k.starts_with("$$"))
}

fn replace(path: &PointerBuf, value: &Value, ops: &mut Vec<PatchOperation>) {
    ops.push(PatchOperation::Replace(ReplaceOperation {
        path: path.clone(),
        value: value.clone(),
    }));
}

fn walk(path: &mut PointerBuf, from: &Value, to: &Value, ops: &mut Vec<PatchOperation>) {
    if exact_eq(from, to) {
        return;
    }
    match (from, to) {
        // Extended JSON wrappers are scalars: replace them whole.
        (Value::Object(a), Value::Object(b)) if !is_wrapper(a) && !is_wrapper(b) => {
            if keeps_order(a, b) {
                for key in a.keys().filter(|k| !b.contains_key(*k)) {
                    path.push_back(key.as_str());
                    ops.push(PatchOperation::Remove(RemoveOperation {
                        path: path.clone(),
                    }));
                    path.pop_back();
                }
                for (key, new) in b {
                    path.push_back(key.as_str());
                    match a.get(key) {
                        Some(old) => walk(path, old, new, ops),
                        None => ops.push(PatchOperation::Add(AddOperation {
                            path: path.clone(),
                            value: new.clone(),
                        })),
                    }
                    path.pop_back();
                }
            } else {
                replace(path, to, ops);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            let common = a.len().min(b.len());
            for i in 0..common {
                path.push_back(i);
                walk(path, &a[i], &b[i], ops);
                path.pop_back();
            }
            for (i, item) in b.iter().enumerate().skip(common) {
                path.push_back(i);
                ops.push(PatchOperation::Add(AddOperation {
                    path: path.clone(),
                    value: item.clone(),
                }));
                path.pop_back();
            }
            for i in (common..a.len()).rev() {
                path.push_back(i);
                ops.push(PatchOperation::Remove(RemoveOperation {
                    path: path.clone(),
                }));
                path.pop_back();
            }
        }
        _ => replace(path, to, ops),
    }
}

/// True when removing the keys missing from `b`, keeping the rest in place, and appending
/// the new keys yields `b`'s key order — the order a patch of removes, in-place replaces
/// and appended adds produces.
fn keeps_order(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    let mut kept = a.keys().filter(|k| b.contains_key(*k));
    let mut b_keys = b.keys();
    // The common keys must lead `b` in `a`'s order …
    for key in kept.by_ref() {
        match b_keys.next() {
            Some(bk) if bk == key => {}
            _ => return false,
        }
    }
    // … and everything after them must be new.
    b_keys.all(|k| !a.contains_key(k))
}
