//! The daemon's NBD server: at most one (QEMU's `nbd-server-start` model), its exports made
//! from block nodes, and their dirty maps from thin deltas.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::state::{State, StateError};
use crate::engine::BlockError;
use crate::nbd::{Bitmap, NbdAddr, NbdError, NbdExport, NbdServer};

#[derive(Debug, thiserror::Error)]
pub enum NbdStateError {
    #[error("an NBD server is already running on {0}")]
    Running(String),
    #[error("no NBD server is running")]
    NotRunning,
    #[error("bitmap '{0}': dirty maps need thin devices: '{1}' is not one")]
    NotThin(String, String),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// How an export was asked for (`nbd-server-add`).
#[derive(Clone, Debug, Default)]
pub struct NbdExportConfig {
    pub device: String,
    /// Defaults to the device's name.
    pub name: Option<String>,
    pub description: Option<String>,
    pub writable: bool,
    /// A base snapshot of `device`: context `qemu:dirty-bitmap:BITMAP` maps what changed since.
    pub bitmap: Option<String>,
}

/// One export, as listed.
#[derive(Clone, Debug)]
pub struct NbdExportInfo {
    pub name: String,
    pub node: String,
    pub writable: bool,
    pub bitmap: Option<String>,
}

#[derive(Default)]
pub struct NbdState {
    server: Mutex<Option<NbdServer>>,
    /// Export name -> node name.
    nodes: Mutex<HashMap<String, String>>,
}

impl NbdState {
    pub fn start(&self, addr: NbdAddr) -> Result<(), NbdStateError> {
        let mut server = self.server.lock();
        if let Some(s) = &*server {
            return Err(NbdStateError::Running(s.addr().to_string()));
        }
        *server = Some(NbdServer::start(addr)?);
        Ok(())
    }

    /// Stops the server: every client is disconnected, every export removed.
    pub fn stop(&self) -> Result<(), NbdStateError> {
        let server = self.server.lock().take();
        self.nodes.lock().clear();
        match server {
            Some(s) => {
                drop(s);
                Ok(())
            }
            None => Err(NbdStateError::NotRunning),
        }
    }

    pub fn add(&self, state: &State, cfg: NbdExportConfig) -> Result<String, NbdStateError> {
        // In the order `State::delete_thin` takes them: node changes, then the server.
        let _changes = state.lock_node_changes();
        let guard = self.server.lock();
        let server = guard.as_ref().ok_or(NbdStateError::NotRunning)?;
        let node = state.node(&cfg.device)?;
        if cfg.writable && node.read_only {
            return Err(StateError::ReadOnlyNode(cfg.device.clone()).into());
        }
        let name = cfg.name.clone().unwrap_or_else(|| cfg.device.clone());
        let thin_info = state
            .thin()
            .and_then(|t| t.list().ok())
            .and_then(|l| l.into_iter().find(|d| d.name == cfg.device));
        let bitmap = match &cfg.bitmap {
            None => None,
            Some(base) => {
                let thin = match (state.thin(), &thin_info) {
                    (Some(t), Some(_)) => t.clone(),
                    _ => return Err(NbdStateError::NotThin(base.clone(), cfg.device.clone())),
                };
                if !thin.exists(base) {
                    return Err(NbdStateError::NotThin(base.clone(), base.clone()));
                }
                let (b, target) = (base.clone(), cfg.device.clone());
                let changed = move |offset: u64, len: u64| {
                    thin.changed_runs(&b, &target, offset, len)
                        .map_err(|e| BlockError::Io {
                            offset,
                            source: std::io::Error::other(e.to_string()),
                        })
                };
                Some(Bitmap {
                    name: base.clone(),
                    changed: Box::new(changed),
                })
            }
        };
        // Unmapping is what makes zeroing fast; a device with an external origin writes
        // zeros instead (its unmapped blocks read the origin).
        let fast_zero = thin_info.as_ref().is_some_and(|d| d.origin.is_none());
        let export = NbdExport {
            name: name.clone(),
            description: cfg.description.clone().unwrap_or_default(),
            // Writes pass the node's write threshold, as a vhost export's do.
            dev: state.watched(&cfg.device, node.dev.clone()),
            node: node.dev,
            writable: cfg.writable,
            fast_zero,
            bitmap,
        };
        server.add(export)?;
        self.nodes.lock().insert(name.clone(), cfg.device);
        Ok(name)
    }

    /// `hard`: disconnect its clients; otherwise refused while it has any.
    pub fn remove(&self, name: &str, hard: bool) -> Result<(), NbdStateError> {
        let guard = self.server.lock();
        let server = guard.as_ref().ok_or(NbdStateError::NotRunning)?;
        server.remove(name, hard)?;
        self.nodes.lock().remove(name);
        Ok(())
    }

    /// The NBD exports of node `node`.
    pub fn exports_of(&self, node: &str) -> Vec<String> {
        self.nodes
            .lock()
            .iter()
            .filter(|(_, n)| *n == node)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// The server's address and its exports, if it runs.
    pub fn list(&self) -> Option<(String, Vec<NbdExportInfo>)> {
        let guard = self.server.lock();
        let server = guard.as_ref()?;
        let nodes = self.nodes.lock();
        let exports = server
            .exports()
            .iter()
            .map(|e| NbdExportInfo {
                name: e.name.clone(),
                node: nodes.get(&e.name).cloned().unwrap_or_default(),
                writable: e.writable,
                bitmap: e.bitmap.as_ref().map(|b| b.name.clone()),
            })
            .collect();
        Some((server.addr().to_string(), exports))
    }

    /// Clients connected now (for tests).
    pub fn connections(&self) -> usize {
        self.server.lock().as_ref().map_or(0, |s| s.connections())
    }
}

impl Drop for NbdState {
    fn drop(&mut self) {
        drop(self.server.lock().take());
    }
}
