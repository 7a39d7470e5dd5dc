//! Starting again what QMP made before a restart: the snapshot nodes and exports in the
//! state file (`saved.rs`), after the command line's own exports, which win: a saved export
//! whose id or socket a running export already has is skipped, not an error. One that fails
//! to start (its device deleted offline, its socket taken) is logged and stays saved, so it
//! starts again once the cause is gone; `block-export-del` of its id forgets it.

use std::sync::Arc;

use log::{error, info};

use super::saved::SavedState;
use super::state::State;
use crate::engine::cow::{open_cow, CowOptions};

/// Opens the saved snapshot nodes and starts the saved exports; returns how many started.
pub fn restore(state: &State, saved: &SavedState) -> usize {
    for cow in saved.cow_nodes() {
        if state.node(&cow.name).is_ok() {
            info!(
                "saved snapshot node {}: a node of that name exists already; keeping it",
                cow.name
            );
            continue;
        }
        let opts = CowOptions {
            chunk_size: cow.chunk_size,
            transient: cow.transient,
            direct: true,
            ..CowOptions::default()
        };
        let opened = open_cow(&cow.origin, &cow.store, &opts)
            .map_err(|e| e.to_string())
            .and_then(|files| {
                state
                    .add_cow_node(&cow.name, Arc::new(files))
                    .map_err(|e| e.to_string())
            });
        match opened {
            Ok(()) => info!("saved snapshot node {} opened", cow.name),
            Err(e) => error!("saved snapshot node {} not opened: {e}", cow.name),
        }
    }
    let mut started = 0;
    for export in saved.exports() {
        let running = state.exports();
        if running.contains(&export.config()) {
            continue; // already running: started from the file before
        }
        if let Some(r) = running
            .iter()
            .find(|r| r.id == export.id || r.socket == export.socket)
        {
            info!(
                "saved export {}: the command line's export {} has its id or socket; keeping that",
                export.id, r.id
            );
            continue;
        }
        match state.add_export(export.config()) {
            Ok(()) => {
                started += 1;
                println!(
                    "export {} at {} (saved)",
                    export.id,
                    export.socket.display()
                );
            }
            Err(e) => error!("saved export {} not started: {e}", export.id),
        }
    }
    started
}
