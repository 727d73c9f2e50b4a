//! Applying a patch while keeping object key order (RFC 6902 over ordered objects).
//!
//! `json_patch::patch` removes object members with a swap, which reorders the keys of the
//! document; BSON documents are ordered, so this module applies patches itself.

use bson::Document;
use json_patch::jsonptr::Pointer;
use json_patch::PatchOperation;
use serde_json::Value;

use super::compute::exact_eq;
use super::repr::{from_value, to_value};
use super::DiffError;

/// Applies `patch` to `doc` and decodes the result. Fails, leaving nothing half-applied,
/// when an operation does not fit or the result is not a valid BSON encoding.
pub fn apply(doc: &Document, patch: &[PatchOperation]) -> Result<Document, DiffError> {
    let mut value = to_value(doc);
    apply_value(&mut value, patch)?;
    from_value(&value)
}

/// Applies `patch` to a value of the type-preserving representation, atomically: on error
/// `value` is unchanged.
pub fn apply_value(value: &mut Value, patch: &[PatchOperation]) -> Result<(), DiffError> {
    let mut work = value.clone();
    for (index, op) in patch.iter().enumerate() {
        apply_one(&mut work, op).map_err(|reason| DiffError::Apply {
            index,
            op: op_name(op),
            path: op.path().to_string(),
            reason,
        })?;
    }
    *value = work;
    Ok(())
}

fn op_name(op: &PatchOperation) -> &'static str {
    match op {
        PatchOperation::Add(_) => "add",
        PatchOperation::Remove(_) => "remove",
        PatchOperation::Replace(_) => "replace",
        PatchOperation::Move(_) => "move",
        PatchOperation::Copy(_) => "copy",
        PatchOperation::Test(_) => "test",
    }
}

fn apply_one(doc: &mut Value, op: &PatchOperation) -> Result<(), String> {
    match op {
        PatchOperation::Add(o) => add(doc, &o.path, o.value.clone()),
        PatchOperation::Remove(o) => remove(doc, &o.path).map(drop),
        PatchOperation::Replace(o) => {
            let target = lookup_mut(doc, &o.path)?;
            *target = o.value.clone();
            Ok(())
        }
        PatchOperation::Move(o) => {
            if o.path.starts_with(&o.from) && o.path != o.from {
                return Err("cannot move a value into one of its own children".into());
            }
            let value = remove(doc, &o.from)?;
            add(doc, &o.path, value)
        }
        PatchOperation::Copy(o) => {
            let value = lookup_mut(doc, &o.from)?.clone();
            add(doc, &o.path, value)
        }
        PatchOperation::Test(o) => {
            if exact_eq(lookup_mut(doc, &o.path)?, &o.value) {
                Ok(())
            } else {
                Err("test failed: value differs".into())
            }
        }
    }
}

fn split(path: &Pointer) -> Result<(&Pointer, String), String> {
    match path.split_back() {
        Some((parent, last)) => Ok((parent, last.decoded().into_owned())),
        None => Err("the document root has no parent".into()),
    }
}

fn lookup_mut<'a>(doc: &'a mut Value, path: &Pointer) -> Result<&'a mut Value, String> {
    let mut current = doc;
    for token in path.tokens() {
        let key = token.decoded();
        current = match current {
            Value::Object(map) => map
                .get_mut(key.as_ref())
                .ok_or_else(|| format!("no member {key:?}"))?,
            Value::Array(items) => {
                let index = array_index(&key, items.len(), false)?;
                &mut items[index]
            }
            _ => return Err(format!("cannot descend into a scalar at {key:?}")),
        };
    }
    Ok(current)
}

fn array_index(token: &str, len: usize, for_insert: bool) -> Result<usize, String> {
    if for_insert && token == "-" {
        return Ok(len);
    }
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return Err(format!("invalid array index {token:?}"));
    }
    let index: usize = token
        .parse()
        .map_err(|_| format!("invalid array index {token:?}"))?;
    let limit = if for_insert {
        len
    } else {
        len.saturating_sub(1)
    };
    if index > limit || (!for_insert && len == 0) {
        return Err(format!("array index {index} out of bounds (length {len})"));
    }
    Ok(index)
}

fn add(doc: &mut Value, path: &Pointer, value: Value) -> Result<(), String> {
    if path.is_root() {
        *doc = value;
        return Ok(());
    }
    let (parent, key) = split(path)?;
    match lookup_mut(doc, parent)? {
        Value::Object(map) => {
            // Replacing an existing member keeps its position; a new one is appended.
            map.insert(key, value);
            Ok(())
        }
        Value::Array(items) => {
            let index = array_index(&key, items.len(), true)?;
            items.insert(index, value);
            Ok(())
        }
        _ => Err("parent is not a container".into()),
    }
}

fn remove(doc: &mut Value, path: &Pointer) -> Result<Value, String> {
    let (parent, key) = split(path)?;
    match lookup_mut(doc, parent)? {
        Value::Object(map) => map
            .shift_remove(&key)
            .ok_or_else(|| format!("no member {key:?}")),
        Value::Array(items) => {
            let index = array_index(&key, items.len(), false)?;
            Ok(items.remove(index))
        }
        _ => Err("parent is not a container".into()),
    }
}
