//! Snapshots of external origins (the exception store): create, query, merge, delete.

use std::path::PathBuf;
use std::sync::Arc;

use log::{error, info};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, NoArgs};
use crate::control::protocol::QmpError;
use crate::daemon::saved::SavedCow;
use crate::daemon::state::State;
use crate::engine::cow::{open_cow, CowFiles, CowOptions, MergeState};

fn status_json(name: &str, files: &CowFiles) -> Value {
    let s = files.device.status();
    json!({
        "name": name,
        "origin": files.origin,
        "store": files.store,
        "valid": s.valid,
        "persistent": s.persistent,
        "chunk-size": s.chunk_size,
        "used-chunks": s.used_chunks,
        "total-chunks": s.total_chunks,
        "fraction-full": s.fraction_full(),
        "exceptions": s.exceptions,
        "merge": match s.merge {
            MergeState::None => "none",
            MergeState::Running => "running",
            MergeState::Done => "done",
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    origin: PathBuf,
    store: PathBuf,
    #[serde(rename = "chunk-size")]
    chunk_size: Option<u64>,
    #[serde(default)]
    transient: bool,
    /// Open it again after a restart (saved beside the pool); default true.
    persistent: Option<bool>,
}

/// A writable snapshot of a read-only origin, as a block node (export it with
/// block-export-add).
pub(super) fn cow_create(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Create = args(v)?;
    if let Some(c) = a.chunk_size {
        if !(4096..=512 << 10).contains(&c) || !c.is_power_of_two() {
            return Err(QmpError::generic(
                "chunk-size must be a power of two from 4096 to 524288",
            ));
        }
    }
    let opts = CowOptions {
        chunk_size: a.chunk_size,
        transient: a.transient,
        direct: true,
        ..CowOptions::default()
    };
    let files = open_cow(&a.origin, &a.store, &opts)
        .map_err(|e| QmpError::generic(format!("cannot open the snapshot: {e}")))?;
    let files = Arc::new(files);
    let status = status_json(&a.name, &files);
    state.add_cow_node(&a.name, files)?;
    if a.persistent.unwrap_or(true) {
        let saved = SavedCow {
            name: a.name.clone(),
            origin: a.origin,
            store: a.store,
            chunk_size: a.chunk_size,
            transient: a.transient,
        };
        if let Err(e) = state.save_cow_node(saved) {
            // Not saved: take it back, so that nothing runs that a restart would lose.
            let _ = state.remove_cow_node(&a.name);
            return Err(e.into());
        }
    }
    Ok(status)
}

pub(super) fn query_cow(state: &State, v: Value) -> Result<Value, QmpError> {
    let NoArgs {} = args(v)?;
    Ok(Value::Array(
        state
            .cows()
            .iter()
            .map(|(name, files)| status_json(name, files))
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
}

/// Starts folding the snapshot into its origin; COW_MERGE_COMPLETED tells when it is done.
/// The node keeps serving meanwhile (and is the origin afterwards).
pub(super) fn cow_merge(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Named = args(v)?;
    let files = state
        .cow(&a.name)
        .ok_or_else(|| QmpError::not_found(format!("no snapshot node named '{}'", a.name)))?;
    if files.device.status().merge == MergeState::Running {
        return Err(QmpError::generic(format!(
            "'{}' is already merging",
            a.name
        )));
    }
    let name = a.name.clone();
    std::thread::Builder::new()
        .name("cow-merge".into())
        .spawn(move || match files.merge() {
            Ok(r) => info!("{name}: merged {} chunks into the origin", r.chunks),
            Err(e) => error!("{name}: merge failed: {e}"),
        })
        .map_err(|e| QmpError::generic(format!("cannot start the merge: {e}")))?;
    Ok(json!({}))
}

/// Forgets a snapshot node no export serves; its files stay.
pub(super) fn cow_delete(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Named = args(v)?;
    state.remove_cow_node(&a.name)?;
    Ok(json!({}))
}
