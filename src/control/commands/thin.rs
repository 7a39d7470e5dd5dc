//! Thin devices: listing, creating, deleting, growing, and the delta between two of them.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, thin, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::state::State;
use crate::engine::limits::check_device_size;

pub(super) fn query_thin_devices(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    let thin = thin(state)?;
    let block = thin.pool().block_size();
    let mut out = Vec::new();
    for d in thin.list()? {
        let exclusive = thin.exclusive_blocks(&d.name)?;
        let exports = state.exports_of(&d.name);
        out.push(json!({
            "name": d.name,
            "id": d.id,
            "size": d.size,
            "mapped-blocks": d.mapped_blocks,
            "mapped-bytes": d.mapped_blocks.saturating_mul(block),
            "exclusive-blocks": exclusive,
            "exclusive-bytes": exclusive.saturating_mul(block),
            "creation-time": d.creation_time,
            "snapshotted-time": d.snapshotted_time,
            "created": d.created,
            "origin": d.origin,
            "export": exports.first(),
            "exports": exports,
        }));
    }
    Ok(Value::Array(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    /// Bytes; with an origin it defaults to the origin's size.
    size: Option<u64>,
    /// A read-only image whose data unmapped blocks read (an external origin).
    origin: Option<std::path::PathBuf>,
}

pub(super) fn thin_create(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Create = args(v)?;
    if let Some(size) = a.size {
        checked_size(size)?;
    }
    let pool = thin(state)?;
    let id = match (&a.origin, a.size) {
        (Some(origin), size) => pool.create_with_origin(&a.name, origin, size)?,
        (None, Some(size)) => pool.create(&a.name, size)?,
        (None, None) => {
            return Err(QmpError::generic(
                "invalid arguments: give 'size', or 'origin' for a device over an image",
            ))
        }
    };
    Ok(json!({ "id": id }))
}

/// A disk size the whole stack can address (see `engine::limits`).
fn checked_size(size: u64) -> Result<u64, QmpError> {
    check_device_size(size)
        .map(|()| size)
        .map_err(|e| QmpError::generic(format!("invalid arguments: 'size': {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
    #[serde(default)]
    force: bool,
}

/// Refused while the device is exported, unless `force`: then its exports stop first.
pub(super) fn thin_delete(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Delete = args(v)?;
    thin(state)?;
    // Even with force: the job would go on reading a device that is gone (job-cancel first).
    refuse_if_mirrored(state, &a.name)?;
    state.delete_thin(&a.name, a.force)?;
    Ok(json!({}))
}

fn refuse_if_mirrored(state: &State, name: &str) -> Result<(), QmpError> {
    if state.is_mirrored(name) {
        return Err(QmpError::generic(format!(
            "'{name}' is being mirrored: cancel or complete its job first"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    device: Option<String>,
    size: u64,
}

/// Grows a thin device and tells the frontends of its exports (a running QEMU guest sees the
/// new capacity at once; a frontend without the backend channel, at its next connection).
pub(super) fn block_resize(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Resize = args(v)?;
    checked_size(a.size)?;
    let name = match (a.node_name, a.device) {
        (Some(n), None) | (None, Some(n)) => n,
        _ => {
            return Err(QmpError::generic(
                "give exactly one of node-name and device",
            ))
        }
    };
    let thin = thin(state)?;
    // The dirty map and the target have the old size.
    refuse_if_mirrored(state, &name)?;
    if !thin.exists(&name) {
        // A node that is not a thin device (a raw file) cannot be resized here.
        state.node(&name)?;
        return Err(QmpError::generic(format!(
            "block node '{name}' is not a thin device and cannot be resized"
        )));
    }
    thin.resize(&name, a.size)?;
    state.node_resized(&name);
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delta {
    base: String,
    target: String,
}

/// The byte ranges where `target` differs from `base`, in the pool's data blocks.
pub(super) fn thin_delta(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Delta = args(v)?;
    let thin = thin(state)?;
    let block = thin.pool().block_size();
    let runs = thin.delta(&a.base, &a.target)?;
    let ranges: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "start": r.begin.saturating_mul(block),
                "length": r.len.saturating_mul(block),
                "kind": r.kind.as_str(),
            })
        })
        .collect();
    Ok(json!({ "block-size": block, "unit": "bytes", "ranges": ranges }))
}
