//! Snapshots of disks in use: one, or several at one instant (`transaction`). Guest I/O is
//! quiesced while they are taken; the replies say for how long.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{args, thin};
use crate::control::protocol::QmpError;
use crate::daemon::state::State;
use crate::engine::thin::SnapshotTiming;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    device: String,
    name: String,
}

fn timing(t: &SnapshotTiming) -> Value {
    json!({
        "ids": t.ids,
        "pause-us": u64::try_from(t.pause.as_micros()).unwrap_or(u64::MAX),
        "commit-us": u64::try_from(t.commit.as_micros()).unwrap_or(u64::MAX),
    })
}

fn take(state: &State, pairs: &[(&str, &str)]) -> Result<SnapshotTiming, QmpError> {
    let t = thin(state)?.snapshot_many_timed(pairs)?;
    log::info!(
        "snapshot of {} device(s): I/O paused {} us, commit {} us",
        pairs.len(),
        t.pause.as_micros(),
        t.commit.as_micros()
    );
    Ok(t)
}

/// thinblk's own: replies with the new id and how long I/O paused.
pub(super) fn thin_snapshot(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Snapshot = args(v)?;
    let t = take(state, &[(&a.device, &a.name)])?;
    let mut reply = timing(&t);
    reply["id"] = json!(t.ids.first());
    Ok(reply)
}

/// QEMU's command; its reply is empty, as QEMU's is.
pub(super) fn blockdev_snapshot_internal_sync(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Snapshot = args(v)?;
    take(state, &[(&a.device, &a.name)])?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "type", content = "data")]
enum Action {
    #[serde(rename = "blockdev-snapshot-internal-sync")]
    InternalSnapshot(Snapshot),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transaction {
    actions: Vec<Action>,
    #[allow(dead_code)]
    properties: Option<Value>,
}

/// Every action in one commit, all or nothing.
pub(super) fn transaction(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Transaction = args(v)?;
    if a.actions.is_empty() {
        return Ok(json!({}));
    }
    let pairs: Vec<(&str, &str)> = a
        .actions
        .iter()
        .map(|Action::InternalSnapshot(s)| (s.device.as_str(), s.name.as_str()))
        .collect();
    take(state, &pairs)?;
    Ok(json!({}))
}
