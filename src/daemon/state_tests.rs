//! The daemon state under concurrent commands.
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::engine::thin::{Pool, PoolGeometry, PoolOptions};

fn thin_pool(dir: &Path) -> Arc<Volumes> {
    let geometry = PoolGeometry {
        block_size: 64 << 10,
        metadata_size: 8 << 20,
        data_size: 64 << 20,
    };
    let pool = Pool::open(
        &dir.join("metadata"),
        &dir.join("data"),
        &geometry,
        PoolOptions::default(),
    )
    .unwrap();
    Volumes::open(pool, &dir.join("devices.json")).unwrap()
}

fn export_of(node: &str, dir: &Path) -> ExportConfig {
    ExportConfig {
        id: format!("{node}-export"),
        node: node.into(),
        socket: dir.join(format!("{node}.sock")),
        writable: true,
        settings: ExportSettings {
            num_queues: 1,
            queue_size: 128,
            poll_us: 0,
            submit_batch: 4,
        },
        access: Default::default(),
    }
}

#[test]
fn a_forced_thin_delete_racing_an_export_add_never_leaves_an_export_on_a_deleted_device() {
    let dir = tempfile::tempdir().unwrap();
    let thin = thin_pool(dir.path());
    thin.create("d", 1 << 20).unwrap();
    let state = State::new(Some(thin.clone()));
    // The export stops between finding its node and starting, until the delete is done (or
    // for half a second, if the delete has to wait for the export).
    let (looked_up, wait_lookup) = mpsc::channel();
    let (deleted, wait_delete) = mpsc::channel::<()>();
    *state.after_lookup.lock() = Some(Box::new(move || {
        let _ = looked_up.send(());
        let _ = wait_delete.recv_timeout(Duration::from_millis(500));
    }));
    let adder = {
        let (state, config) = (state.clone(), export_of("d", dir.path()));
        std::thread::spawn(move || state.add_export(config))
    };
    wait_lookup.recv().unwrap();
    let deleter = {
        let state = state.clone();
        std::thread::spawn(move || {
            let r = state.delete_thin("d", true);
            let _ = deleted.send(());
            r
        })
    };
    let added = adder.join().unwrap();
    let removed = deleter.join().unwrap();
    let exports = state.exports_of("d");
    assert!(
        exports.is_empty() || thin.exists("d"),
        "export {exports:?} serves a deleted device (add: {added:?}, delete: {removed:?})"
    );
    // Either order is fine, but both commands had to answer for what they did.
    assert!(removed.is_ok(), "{removed:?}");
    assert!(!thin.exists("d"));
    // A new device that may take the old id is not served by anything.
    thin.create("e", 1 << 20).unwrap();
    assert!(state.exports().is_empty());
}

#[test]
fn a_thin_delete_without_force_is_refused_while_an_export_add_holds_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let thin = thin_pool(dir.path());
    thin.create("d", 1 << 20).unwrap();
    let state = State::new(Some(thin.clone()));
    let (looked_up, wait_lookup) = mpsc::channel();
    *state.after_lookup.lock() = Some(Box::new(move || {
        let _ = looked_up.send(());
        std::thread::sleep(Duration::from_millis(100));
    }));
    let adder = {
        let (state, config) = (state.clone(), export_of("d", dir.path()));
        std::thread::spawn(move || state.add_export(config))
    };
    wait_lookup.recv().unwrap();
    let removed = state.delete_thin("d", false);
    adder.join().unwrap().unwrap();
    assert!(
        matches!(removed, Err(StateError::Exported { .. })),
        "{removed:?}"
    );
    assert!(thin.exists("d"));
    assert_eq!(state.exports_of("d"), vec!["d-export".to_string()]);
    state.stop_all();
}

#[test]
fn a_node_can_be_exported_twice_under_two_ids_for_a_migration() {
    let dir = tempfile::tempdir().unwrap();
    let thin = thin_pool(dir.path());
    thin.create("d", 1 << 20).unwrap();
    let state = State::new(Some(thin));
    let source = export_of("d", dir.path());
    let mut destination = source.clone();
    destination.id = "d-destination".into();
    destination.socket = dir.path().join("d-destination.sock");
    state.add_export(source.clone()).unwrap();
    state.add_export(destination.clone()).unwrap();
    assert_eq!(state.exports_of("d").len(), 2);
    // Neither runs before a frontend starts its rings; both share one handover.
    assert!(!state.export_active(&source.id) && !state.export_active(&destination.id));
    assert!(Arc::ptr_eq(&state.handover("d"), &state.handover("d")));
    let mut again = destination.clone();
    again.socket = dir.path().join("other.sock");
    assert!(matches!(
        state.add_export(again),
        Err(StateError::ExportExists(_))
    ));
    state.stop_all();
}
