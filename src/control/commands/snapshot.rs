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

/// QEMU's command; its reply is empty, as QEMU's is. A thin device's snapshot is a new
/// thin device; a node that is not one takes the snapshot itself if its backing has them
/// (an `rbd=` export: an RBD snapshot of its image).
pub(super) fn blockdev_snapshot_internal_sync(state: &State, v: Value) -> Result<Value, QmpError> {
    let a: Snapshot = args(v)?;
    if let Some(node) = own_snapshot_node(state, &a.device) {
        node.dev
            .snapshot_internal(&a.name)
            .map_err(|e| QmpError::generic(format!("snapshot of '{}': {e}", a.device)))?;
        log::info!("snapshot '{}' of node {} taken", a.name, a.device);
        return Ok(json!({}));
    }
    take(state, &[(&a.device, &a.name)])?;
    Ok(json!({}))
}

/// The node called `device` if it is not a thin device of the pool.
fn own_snapshot_node(state: &State, device: &str) -> Option<crate::daemon::state::Node> {
    if state.thin().is_some_and(|t| t.exists(device)) {
        return None;
    }
    state.node(device).ok()
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;
    use serde_json::json;

    use super::*;
    use crate::daemon::state::Node;
    use crate::engine::null::NullDevice;
    use crate::engine::{BlockDevice, BlockError, Bufs, BufsMut};

    /// A null device that takes snapshots of itself (as an RBD image does), recording names.
    struct Snapshotting {
        inner: NullDevice,
        taken: Mutex<Vec<String>>,
    }

    impl BlockDevice for Snapshotting {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
            self.inner.read(offset, bufs)
        }
        fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
            self.inner.write(offset, bufs)
        }
        fn flush(&self) -> Result<(), BlockError> {
            self.inner.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
            self.inner.write_zeroes(offset, len, may_unmap)
        }
        fn snapshot_internal(&self, name: &str) -> Result<(), BlockError> {
            self.taken.lock().push(name.into());
            Ok(())
        }
    }

    fn call(state: &State, v: Value) -> Result<Value, QmpError> {
        blockdev_snapshot_internal_sync(state, v)
    }

    #[test]
    fn internal_snapshots_of_a_node_that_is_no_thin_device_go_to_the_device() {
        let state = State::new(None);
        let dev = Arc::new(Snapshotting {
            inner: NullDevice::new(1 << 20),
            taken: Mutex::new(Vec::new()),
        });
        let node = |dev: Arc<dyn BlockDevice>| Node {
            dev,
            read_only: false,
        };
        state.add_node("img", node(dev.clone())).unwrap();
        state
            .add_node("null", node(Arc::new(NullDevice::new(1 << 20))))
            .unwrap();
        assert_eq!(
            call(&state, json!({"device": "img", "name": "s1"})).unwrap(),
            json!({})
        );
        assert_eq!(*dev.taken.lock(), ["s1"]);
        let e = call(&state, json!({"device": "null", "name": "s1"})).unwrap_err();
        assert!(
            e.desc.contains("'null'") && e.desc.contains("not supported"),
            "{}",
            e.desc
        );
        // Neither a node nor a thin device: the thin pool's answer, as before.
        let e = call(&state, json!({"device": "nope", "name": "s1"})).unwrap_err();
        assert!(e.desc.contains("no thin pool"), "{}", e.desc);
    }
}
