//! What a running daemon holds: named block nodes, the exports serving them, and the clients
//! that listen for events. The control socket and the command line both act through this.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use log::info;
use parking_lot::Mutex;
use serde_json::Value;

use super::counted::Counted;
use super::events::EventBus;
use super::export_settings::{ExportSettings, SettingsError};
use super::saved::{SavedCow, SavedError, SavedState};
use super::stats::{counting_invalid, ExportStats};
use super::throttle::{Limits, LimitsError, ThrottleGroups, ThrottleSlot};
use super::watch::{forward_pool_events, io_error_sink, Watched, WriteThreshold};
use crate::engine::cow::{CowEvent, CowFiles};
use crate::engine::thin::{VolumeError, Volumes};
use crate::engine::BlockDevice;
use crate::mirror::WriteHook;
use crate::socket_access::SocketAccess;
use crate::sockets::{bind_with, SocketError};
use crate::vhost::handover::Handover;
use crate::vhost::Export;

/// A named disk that exports can serve.
#[derive(Clone)]
pub struct Node {
    pub dev: Arc<dyn BlockDevice>,
    /// The node itself refuses writes, so no export of it may be writable.
    pub read_only: bool,
}

/// How an export was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    pub id: String,
    pub node: String,
    pub socket: PathBuf,
    pub writable: bool,
    pub settings: ExportSettings,
    /// The socket's owner, group and mode as asked; unset fields take the daemon's defaults.
    pub access: SocketAccess,
}

struct RunningExport {
    config: ExportConfig,
    /// Dropping it stops the export and removes its socket.
    export: Export,
    /// What its frontends' requests did (query-blockstats).
    stats: Arc<ExportStats>,
    /// Its I/O limits (block-set-io-throttle).
    throttle: Arc<ThrottleSlot>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no block node named '{0}'")]
    NoNode(String),
    #[error("block node '{0}' already exists")]
    NodeExists(String),
    #[error("block node '{0}' is in use by export '{1}'")]
    NodeInUse(String, String),
    #[error("no export with id '{0}'")]
    NoExport(String),
    #[error("an export with id '{0}' already exists")]
    ExportExists(String),
    #[error("block node '{0}' is read-only; the export cannot be writable")]
    ReadOnlyNode(String),
    #[error("block node '{node}' is exported as '{export}'; force=true stops the export first")]
    Exported { node: String, export: String },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Thin(#[from] VolumeError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Saved(#[from] SavedError),
}

#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    #[error("no export with id '{0}'")]
    NoExport(String),
    #[error(transparent)]
    Limits(#[from] LimitsError),
}

/// The daemon's shared state.
#[derive(Default)]
pub struct State {
    /// The thin pool, whose devices are block nodes by name: set at start, or by a take-over
    /// of a pool on RBD this daemon stood by for (`standby.rs`).
    thin: std::sync::OnceLock<Arc<Volumes>>,
    /// The pool on RBD this daemon stands by for (`--standby`), until and after it took it
    /// over.
    standby: std::sync::OnceLock<Arc<super::standby::Standby>>,
    nodes: Mutex<BTreeMap<String, Node>>,
    /// COW nodes (also in `nodes`), for status and merge.
    cows: Mutex<BTreeMap<String, Arc<CowFiles>>>,
    exports: Mutex<BTreeMap<String, RunningExport>>,
    /// Held from a node's lookup until its export runs, and by a thin device's deletion from
    /// its check for exports until the device is gone, so that an export never starts on a
    /// device being deleted (whose id a new device may then reuse).
    node_changes: Mutex<()>,
    /// Runs between an export's node lookup and its start (tests widen the window with it).
    #[cfg(test)]
    after_lookup: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Where events go; QMP clients take them from there.
    events: EventBus,
    /// The owner, group and mode of export sockets that ask for none (`--socket-*`).
    socket_defaults: Mutex<SocketAccess>,
    /// Where exports and nodes made over QMP are saved, when the daemon has a pool.
    saved: std::sync::OnceLock<SavedState>,
    /// Throttle groups by name (block-set-io-throttle).
    throttles: ThrottleGroups,
    /// Write thresholds by node name; every export of a node writes through its threshold.
    thresholds: Mutex<HashMap<String, Arc<WriteThreshold>>>,
    /// Which export of a node runs it, by node name: a node may be exported several times (the
    /// destination of a migration), one export running at a time (`vhost/handover.rs`).
    handovers: Mutex<HashMap<String, Arc<Handover>>>,
    /// This state, for the callbacks (exports, the pool) that report back to it.
    me: Weak<State>,
    /// The NBD server and its exports (src/daemon/nbd.rs).
    nbd: super::nbd::NbdState,
    /// Mirror hooks by node name: every export of a node writes through its hook.
    write_hooks: Mutex<HashMap<String, Arc<WriteHook>>>,
    /// Background jobs (thin-mirror), QEMU-style (src/daemon/jobs.rs).
    jobs: super::jobs::Jobs,
    /// How to reach Ceph for `rbd=` exports (`--ceph-conf`, `--ceph-id`).
    ceph: std::sync::OnceLock<crate::engine::rbd::CephOptions>,
}

impl State {
    pub fn new(thin: Option<Arc<Volumes>>) -> Arc<State> {
        let state = Arc::new_cyclic(|me| State {
            me: me.clone(),
            ..State::default()
        });
        if let Some(thin) = thin {
            state.set_thin(thin);
        }
        let me = state.me.clone();
        state.jobs.set_sink(Arc::new(move |name, data| {
            if let Some(state) = me.upgrade() {
                state.emit(name, data);
            }
        }));
        state
    }

    /// Background jobs.
    pub fn jobs(&self) -> &super::jobs::Jobs {
        &self.jobs
    }

    /// The NBD server and its exports.
    pub fn nbd(&self) -> &super::nbd::NbdState {
        &self.nbd
    }

    /// Held while a node is looked up for an export and the export starts (see
    /// `node_changes`).
    pub(super) fn lock_node_changes(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.node_changes.lock()
    }

    /// `dev` (node `node`) as exports write to it: through the node's write threshold.
    pub(super) fn watched(&self, node: &str, dev: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        Arc::new(Watched::new(
            dev,
            node,
            self.write_threshold(node),
            self.write_hook(node),
            self.me.clone(),
        ))
    }

    /// The write threshold of node `name` (created disarmed).
    pub fn write_threshold(&self, name: &str) -> Arc<WriteThreshold> {
        self.thresholds
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The mirror hook of node `name` (tracking nothing, refusing nothing, until a mirror
    /// of the node uses it).
    pub fn write_hook(&self, name: &str) -> Arc<WriteHook> {
        self.write_hooks
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Whether a mirror job tracks writes of node `name` now.
    pub fn is_mirrored(&self, name: &str) -> bool {
        self.write_hooks
            .lock()
            .get(name)
            .is_some_and(|h| h.tracking())
    }

    /// Sets the owner, group and mode of export sockets that ask for none.
    pub fn set_socket_defaults(&self, access: SocketAccess) {
        *self.socket_defaults.lock() = access;
    }

    /// Saves exports and nodes made over QMP in `saved` from now on (set once, at start).
    pub fn set_saved(&self, saved: SavedState) {
        let _ = self.saved.set(saved);
    }

    pub fn saved(&self) -> Option<&SavedState> {
        self.saved.get()
    }

    /// [`State::add_export`], then saved so that it starts again after a restart. If it
    /// cannot be saved it is stopped again and the error returned: an export the caller
    /// asked to persist never runs unsaved.
    pub fn add_saved_export(&self, config: ExportConfig) -> Result<(), StateError> {
        self.add_export(config.clone())?;
        let Some(saved) = self.saved() else {
            return Ok(());
        };
        if let Err(e) = saved.remember_export(&config) {
            let undone = self.exports.lock().remove(&config.id);
            drop(undone);
            return Err(e.into());
        }
        Ok(())
    }

    /// Saves a snapshot node made over QMP (it is opened again after a restart).
    pub fn save_cow_node(&self, cow: SavedCow) -> Result<(), StateError> {
        match self.saved() {
            Some(saved) => Ok(saved.remember_cow(cow)?),
            None => Ok(()),
        }
    }

    /// Sets how `rbd=` exports reach Ceph; only the first call counts.
    pub fn set_ceph(&self, opts: crate::engine::rbd::CephOptions) {
        let _ = self.ceph.set(opts);
    }

    /// How `rbd=` exports reach Ceph (librados's defaults unless set).
    pub fn ceph(&self) -> crate::engine::rbd::CephOptions {
        self.ceph.get().cloned().unwrap_or_default()
    }

    pub fn thin(&self) -> Option<&Arc<Volumes>> {
        self.thin.get()
    }

    /// Makes `thin` the daemon's pool (its events forwarded to QMP clients); false if there
    /// is one already.
    pub fn set_thin(&self, thin: Arc<Volumes>) -> bool {
        let first = self.thin.set(thin).is_ok();
        if let Some(thin) = self.thin.get().filter(|_| first) {
            forward_pool_events(thin, self.me.clone());
        }
        first
    }

    /// Makes this daemon stand by for a pool on RBD (set once, at start).
    pub fn set_standby(&self, standby: Arc<super::standby::Standby>) {
        let _ = self.standby.set(standby);
    }

    /// The pool on RBD this daemon stands (or stood) by for.
    pub fn standby(&self) -> Option<&Arc<super::standby::Standby>> {
        self.standby.get()
    }

    pub fn add_node(&self, name: &str, node: Node) -> Result<(), StateError> {
        let mut nodes = self.nodes.lock();
        if nodes.contains_key(name) {
            return Err(StateError::NodeExists(name.into()));
        }
        nodes.insert(name.into(), node);
        Ok(())
    }

    /// Removes a plain node (raw, null) no export serves.
    pub fn remove_node(&self, name: &str) -> Result<(), StateError> {
        let _changes = self.node_changes.lock();
        if let Some(e) = self.exports.lock().values().find(|e| e.config.node == name) {
            return Err(StateError::NodeInUse(name.into(), e.config.id.clone()));
        }
        match self.nodes.lock().remove(name) {
            Some(_) => Ok(()),
            None => Err(StateError::NoNode(name.into())),
        }
    }

    /// Adds a COW device as a block node; its events become COW_INVALIDATED and
    /// COW_MERGE_COMPLETED events with the node name.
    pub fn add_cow_node(&self, name: &str, files: Arc<CowFiles>) -> Result<(), StateError> {
        let node = Node {
            dev: files.device.clone(),
            read_only: false,
        };
        self.add_node(name, node)?;
        let state = self.me.clone();
        let node_name = name.to_string();
        files.device.subscribe(Arc::new(move |e: &CowEvent| {
            let Some(state) = state.upgrade() else { return };
            match e {
                CowEvent::Invalidated { reason } => state.emit(
                    "COW_INVALIDATED",
                    serde_json::json!({ "node-name": node_name, "reason": reason }),
                ),
                CowEvent::MergeCompleted { chunks } => state.emit(
                    "COW_MERGE_COMPLETED",
                    serde_json::json!({ "node-name": node_name, "chunks": chunks }),
                ),
            }
        }));
        self.cows.lock().insert(name.into(), files);
        Ok(())
    }

    /// Every COW node, by name.
    pub fn cows(&self) -> Vec<(String, Arc<CowFiles>)> {
        self.cows
            .lock()
            .iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect()
    }

    /// The COW device called `name`, with its origin and store paths.
    pub fn cow(&self, name: &str) -> Option<Arc<CowFiles>> {
        self.cows.lock().get(name).cloned()
    }

    /// Removes a COW node no export serves; returns it (its files stay).
    pub fn remove_cow_node(&self, name: &str) -> Result<Arc<CowFiles>, StateError> {
        // No export may start on it between the check and the removal.
        let _changes = self.node_changes.lock();
        if let Some(e) = self.exports.lock().values().find(|e| e.config.node == name) {
            return Err(StateError::NodeInUse(name.into(), e.config.id.clone()));
        }
        let files = self
            .cows
            .lock()
            .remove(name)
            .ok_or_else(|| StateError::NoNode(name.into()))?;
        self.nodes.lock().remove(name);
        if let Some(Err(e)) = self.saved().map(|s| s.forget_cow(name)) {
            log::warn!("snapshot node {name} removed but still saved: {e}");
        }
        Ok(files)
    }

    /// Named nodes and thin devices.
    pub fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.lock().keys().cloned().collect();
        if let Some(thin) = self.thin.get() {
            names.extend(thin.list().unwrap_or_default().into_iter().map(|d| d.name));
        }
        names
    }

    pub fn node(&self, name: &str) -> Result<Node, StateError> {
        if let Some(node) = self.nodes.lock().get(name).cloned() {
            return Ok(node);
        }
        match self.thin.get() {
            Some(thin) if thin.exists(name) => Ok(Node {
                dev: thin
                    .device(name)
                    .map_err(|_| StateError::NoNode(name.into()))?,
                read_only: false,
            }),
            _ => Err(StateError::NoNode(name.into())),
        }
    }

    /// Starts serving a node on a new socket.
    pub fn add_export(&self, config: ExportConfig) -> Result<(), StateError> {
        config.settings.validate()?;
        let _changes = self.node_changes.lock();
        let node = self.node(&config.node)?;
        #[cfg(test)]
        if let Some(hook) = &*self.after_lookup.lock() {
            hook();
        }
        if config.writable && node.read_only {
            return Err(StateError::ReadOnlyNode(config.node.clone()));
        }
        let mut exports = self.exports.lock();
        if exports.contains_key(&config.id) {
            return Err(StateError::ExportExists(config.id.clone()));
        }
        let settings = config
            .settings
            .device_settings(&config.id, !config.writable);
        let dev: Arc<dyn BlockDevice> = Arc::new(Watched::new(
            node.dev,
            &config.node,
            self.write_threshold(&config.node),
            self.write_hook(&config.node),
            self.me.clone(),
        ));
        let stats = ExportStats::new();
        let throttle = Arc::new(ThrottleSlot::default());
        let dev: Arc<dyn BlockDevice> =
            Arc::new(Counted::new(dev, stats.clone(), throttle.clone()));
        let sink = io_error_sink(self.me.clone(), &config.id, &config.node);
        let sink = counting_invalid(stats.clone(), sink);
        let turn = self.handover(&config.node).member(&config.id);
        let access = config.access.or(*self.socket_defaults.lock());
        let listener = bind_with(&config.socket, &access)?;
        let export = Export::start_on(dev, settings, &config.socket, listener, Some(sink), turn)?;
        info!(
            "export {} of node {} at {}",
            config.id,
            config.node,
            config.socket.display()
        );
        let running = RunningExport {
            config,
            export,
            stats,
            throttle,
        };
        exports.insert(running.config.id.clone(), running);
        Ok(())
    }

    /// Deletes the thin device `name`. Refused while it is exported, unless `force`: then its
    /// exports stop first. No export can start on it meanwhile.
    pub fn delete_thin(&self, name: &str, force: bool) -> Result<(), StateError> {
        let thin = self
            .thin
            .get()
            .ok_or_else(|| StateError::NoNode(name.into()))?;
        let _changes = self.node_changes.lock();
        if !thin.exists(name) {
            return Err(VolumeError::NoSuchDisk(name.into()).into());
        }
        let mut exports = self.exports_of(name);
        let nbd_exports = self.nbd.exports_of(name);
        exports.extend(nbd_exports.iter().cloned());
        if let (Some(export), false) = (exports.first(), force) {
            return Err(StateError::Exported {
                node: name.into(),
                export: export.clone(),
            });
        }
        for id in &nbd_exports {
            // Disconnects its clients; their requests in flight finish first.
            let _ = self.nbd.remove(id, true);
        }
        for id in exports.iter().filter(|e| !nbd_exports.contains(e)) {
            self.remove_export(id)?;
        }
        thin.delete(name, force)?;
        // A later device of the same name starts without this one's threshold.
        self.write_threshold(name).set(0);
        Ok(())
    }

    /// Stops an export; its frontend sees the socket close. A saved export that did not
    /// start (see `restore.rs`) is forgotten.
    pub fn remove_export(&self, id: &str) -> Result<(), StateError> {
        self.stop_export(id, true)
    }

    /// Stops an export the configuration no longer asks for (SIGHUP), keeping a saved
    /// export of the same id saved: the configuration's had only stood in for it.
    pub fn remove_configured_export(&self, id: &str) -> Result<(), StateError> {
        self.stop_export(id, false)
    }

    fn stop_export(&self, id: &str, forget: bool) -> Result<(), StateError> {
        let removed = self.exports.lock().remove(id);
        let Some(export) = removed else {
            let saved = self
                .saved()
                .filter(|s| forget && s.exports().iter().any(|e| e.id == id));
            if let Some(saved) = saved {
                saved.forget_export(id)?;
                info!("saved export {id} (not running) forgotten");
                return Ok(());
            }
            return Err(StateError::NoExport(id.into()));
        };
        drop(export);
        info!("export {id} stopped");
        let saved = self.saved().filter(|_| forget);
        if let Some(Err(e)) = saved.map(|s| s.forget_export(id)) {
            log::warn!("export {id} stopped but still saved: {e}");
        }
        self.emit("BLOCK_EXPORT_DELETED", serde_json::json!({ "id": id }));
        Ok(())
    }

    pub fn exports(&self) -> Vec<ExportConfig> {
        self.exports
            .lock()
            .values()
            .map(|e| e.config.clone())
            .collect()
    }

    /// Tells the frontends of every export of `node` that its size changed.
    pub fn node_resized(&self, node: &str) {
        for e in self.exports.lock().values() {
            if e.config.node == node {
                e.export.config_changed();
            }
        }
    }

    /// The ids of the exports serving node `node`.
    pub fn exports_of(&self, node: &str) -> Vec<String> {
        self.exports
            .lock()
            .values()
            .filter(|e| e.config.node == node)
            .map(|e| e.config.id.clone())
            .collect()
    }

    /// The handover of node `name` among its exports.
    fn handover(&self, name: &str) -> Arc<Handover> {
        self.handovers
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Whether export `id` runs its node now (its frontend has started rings).
    pub fn export_active(&self, id: &str) -> bool {
        self.exports
            .lock()
            .get(id)
            .is_some_and(|e| e.export.active())
    }

    /// Every export with its statistics, by id.
    pub fn export_stats(&self) -> Vec<(ExportConfig, Arc<ExportStats>)> {
        self.exports
            .lock()
            .values()
            .map(|e| (e.config.clone(), e.stats.clone()))
            .collect()
    }

    /// Sets export `id`'s limits, in throttle group `group` (default: its id). All-zero
    /// limits lift them.
    pub fn set_io_throttle(
        &self,
        id: &str,
        group: Option<&str>,
        limits: Limits,
    ) -> Result<(), ThrottleError> {
        let slot = self
            .exports
            .lock()
            .get(id)
            .map(|e| e.throttle.clone())
            .ok_or_else(|| ThrottleError::NoExport(id.into()))?;
        Ok(self.throttles.apply(&slot, group.unwrap_or(id), limits)?)
    }

    pub fn export_socket(&self, id: &str) -> Option<PathBuf> {
        self.exports.lock().get(id).map(|e| e.config.socket.clone())
    }

    /// Stops every export for a graceful upgrade (`upgrade.rs`): sessions end once their
    /// requests completed, sockets stay listening. Returns each socket's path and listener.
    pub fn hand_over_exports(&self) -> Vec<(PathBuf, std::os::unix::net::UnixListener)> {
        let all = std::mem::take(&mut *self.exports.lock());
        all.into_values()
            .filter_map(|e| Some((e.config.socket, e.export.hand_over()?)))
            .collect()
    }

    /// Stops every export (at shutdown).
    pub fn stop_all(&self) {
        // Jobs first: a mirror writes through exports and the NBD client until it stops.
        self.jobs.cancel_all();
        let _ = self.nbd.stop();
        let all = std::mem::take(&mut *self.exports.lock());
        drop(all);
    }

    /// The clients' event queues.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Queues an event for every listening client and returns at once: nothing here waits
    /// for a client to read.
    pub fn emit(&self, name: &'static str, data: Value) {
        self.events.send(name, data);
    }
}

pub fn socket_path_is_valid(path: &Path) -> bool {
    let len = path.as_os_str().len();
    // sun_path holds 108 bytes including the terminating NUL.
    len > 0 && len < 108 && !path.as_os_str().as_encoded_bytes().contains(&0)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
