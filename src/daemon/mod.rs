//! `thinblk serve`: opens the pool and devices, starts the exports and the control socket,
//! and waits for a signal to stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::info;

use crate::control::ControlServer;
use crate::engine::cow::{open_cow, CowError, CowOptions};
use crate::engine::null::NullDevice;
use crate::engine::raw::{RawDevice, RawOptions};
use crate::engine::thin::{Pool, PoolGeometry, PoolOpenError, PoolOptions, VolumeError, Volumes};
use crate::engine::BlockDevice;
use crate::export_spec::{Backing, ExportSpec};
use crate::socket_access::SocketAccess;
use crate::sockets::SocketError;
use export_settings::ExportSettings;
use state::{ExportConfig, Node, State, StateError};

pub mod counted;
pub mod events;
pub mod export_settings;
mod fd_limit;
pub mod histogram;
pub mod jobs;
pub mod metrics;
mod mirror_writes;
pub mod nbd;
pub mod notify;
pub mod rbd_pool;
mod reload;
mod restore;
pub mod saved;
pub mod standby;
pub mod state;
pub mod stats;
pub mod throttle;
pub mod throttle_timer;
pub mod upgrade;
pub mod watch;

/// Size of the disk `thinblk serve` creates when run with no options.
pub const DEFAULT_DISK_SIZE: u64 = 16 << 30;
/// Name of that disk.
pub const DEFAULT_DISK: &str = "disk0";
/// Where `thinblk serve` keeps its files when run with no options.
pub const DEFAULT_POOL_DIR: &str = "thinblk-pool";

/// Why `serve` could not start (or stop) cleanly. The cause of each is its `source`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what} {}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the pool {}", .path.display())]
    Pool {
        path: PathBuf,
        #[source]
        source: PoolOpenError,
    },
    #[error(transparent)]
    RbdPool(#[from] rbd_pool::RbdPoolError),
    #[error("opening the snapshot {}", .path.display())]
    Cow {
        path: PathBuf,
        #[source]
        source: CowError,
    },
    #[error(transparent)]
    Thin(#[from] VolumeError),
    #[error("thin exports need a pool")]
    NoPool,
    #[error("thin device '{0}' does not exist; give size=, snapshot-of= or origin= to create it")]
    NoThinDevice(String),
    #[error("export {0} needs socket=")]
    NoSocket(String),
    #[error("starting export {id}")]
    Export {
        id: String,
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("starting the control socket {}", .path.display())]
    Control {
        path: PathBuf,
        #[source]
        source: SocketError,
    },
    #[error("NBD server")]
    Nbd(#[source] nbd::NbdStateError),
    #[error(transparent)]
    Saved(#[from] saved::SavedError),
    #[error("serving metrics at {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for SIGINT and SIGTERM")]
    Signals(#[source] std::io::Error),
    #[error("opening the RBD image {image}")]
    Rbd {
        image: String,
        #[source]
        source: std::io::Error,
    },
}

fn file_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServeError {
    let path = path.to_path_buf();
    move |source| ServeError::File { what, path, source }
}

/// Where a pool lives and how a new one is shaped.
#[derive(Clone, Debug)]
pub struct PoolLocation {
    /// Holds the sockets of thin exports that name none (and, by default, the pool files).
    pub dir: PathBuf,
    pub metadata: PathBuf,
    pub data: PathBuf,
    /// The device names, beside the metadata.
    pub catalog: PathBuf,
    /// Exports and nodes made over QMP (`exports.json`), beside the catalog.
    pub saved: PathBuf,
    pub geometry: PoolGeometry,
    pub options: PoolOptions,
    /// Set when the metadata and data devices are RBD images (`metadata` and `data` are then
    /// unused; the catalog and saved exports stay files in `dir`).
    pub rbd: Option<rbd_pool::RbdPoolSpec>,
}

impl PoolLocation {
    /// The files of a pool kept in one directory.
    pub fn in_dir(dir: &Path, geometry: PoolGeometry, options: PoolOptions) -> Self {
        PoolLocation {
            dir: dir.to_path_buf(),
            metadata: dir.join("metadata"),
            data: dir.join("data"),
            catalog: dir.join("devices.json"),
            saved: dir.join("exports.json"),
            geometry,
            options,
            rbd: None,
        }
    }
}

/// Everything `serve` runs.
pub struct ServeConfig {
    pub exports: Vec<ExportSpec>,
    pub pool: Option<PoolLocation>,
    pub control: Option<PathBuf>,
    /// An NBD server to start; every export's node is also exported on it, read-only,
    /// under the export's id (more with QMP `nbd-server-add`).
    pub nbd: Option<crate::nbd::NbdAddr>,
    /// Owner, group and mode of export sockets that ask for none.
    pub socket_defaults: SocketAccess,
    /// Owner, group and mode of the control socket.
    pub control_access: SocketAccess,
    /// Reads the configuration again (at SIGHUP) and returns the exports it now asks for.
    pub reload: Option<Reload>,
    /// Where to serve Prometheus metrics (`--metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// How to reach Ceph for `rbd=` exports (`--ceph-conf`, `--ceph-id`).
    pub ceph: crate::engine::rbd::CephOptions,
}

/// See [`ServeConfig::reload`].
pub type Reload = Box<dyn Fn() -> Result<Vec<ExportSpec>, String> + Send>;

/// The export a bare `thinblk serve` runs: the thin disk `disk0`, created on the first run.
pub fn default_export() -> ExportSpec {
    ExportSpec {
        backing: Backing::Thin {
            name: DEFAULT_DISK.into(),
            size: Some(DEFAULT_DISK_SIZE),
            snapshot_of: None,
            origin: None,
        },
        socket: None,
        id: DEFAULT_DISK.into(),
        read_only: false,
        direct: true,
        settings: ExportSettings::default(),
        access: SocketAccess::default(),
    }
}

fn private_dir(dir: &Path) -> Result<(), ServeError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(file_error("creating", dir))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(file_error("restricting", dir))?;
    }
    Ok(())
}

/// Creates the pool directory (private) if `path` is to be made in it and it is missing.
/// Only then: with every path given elsewhere, `serve` creates no directory at all.
fn dir_for(loc: &PoolLocation, path: &Path) -> Result<(), ServeError> {
    if path.parent() == Some(loc.dir.as_path()) {
        private_dir(&loc.dir)?;
    }
    Ok(())
}

pub(crate) fn open_pool(loc: &PoolLocation) -> Result<Arc<Volumes>, ServeError> {
    for file in [&loc.metadata, &loc.data, &loc.catalog] {
        dir_for(loc, file)?;
    }
    let pool = match &loc.rbd {
        Some(spec) => rbd_pool::open(spec, &loc.geometry, loc.options.clone())?,
        None => Pool::open(&loc.metadata, &loc.data, &loc.geometry, loc.options.clone()).map_err(
            |source| ServeError::Pool {
                path: loc.metadata.clone(),
                source,
            },
        )?,
    };
    let m = pool.meta();
    info!(
        "pool {}: {} of {} data blocks free ({} KiB each), {} of {} metadata blocks free",
        loc.metadata.display(),
        m.free_data_blocks(),
        m.data_dev_size(),
        pool.block_size() >> 10,
        m.free_metadata_blocks(),
        m.metadata_dev_size()
    );
    drop(m);
    Ok(Volumes::open(pool, &loc.catalog)?)
}

fn open_device(
    spec: &ExportSpec,
    thin: Option<&Arc<Volumes>>,
    state: &Arc<State>,
) -> Result<Arc<dyn BlockDevice>, ServeError> {
    match &spec.backing {
        Backing::Raw(path) => {
            let opts = RawOptions {
                read_only: spec.read_only,
                direct: spec.direct,
            };
            let dev = RawDevice::open(path, opts).map_err(file_error("opening", path))?;
            info!(
                "{}: raw {} ({} bytes, {})",
                spec.id,
                path.display(),
                dev.size(),
                if dev.is_direct() {
                    "O_DIRECT"
                } else {
                    "buffered"
                }
            );
            Ok(Arc::new(dev))
        }
        Backing::Null(size) => {
            info!("{}: null device of {size} bytes", spec.id);
            Ok(Arc::new(NullDevice::new(*size)))
        }
        Backing::Rbd(image) => {
            let dev = crate::engine::rbd::open_device(image, &state.ceph(), spec.read_only)
                .map_err(|source| ServeError::Rbd {
                    image: image.to_string(),
                    source,
                })?;
            info!("{}: RBD image {image} ({} bytes)", spec.id, dev.size());
            Ok(dev)
        }
        Backing::Cow(c) => {
            let opts = CowOptions {
                chunk_size: c.chunk_size,
                transient: c.transient,
                store_size: c.store_size,
                direct: spec.direct,
            };
            let files = open_cow(&c.origin, &c.store, &opts).map_err(|source| ServeError::Cow {
                path: c.store.clone(),
                source,
            })?;
            let st = files.device.status();
            info!(
                "{}: snapshot of {} in {} ({}, {} KiB chunks, {} exceptions, {:.1}% full{})",
                spec.id,
                c.origin.display(),
                c.store.display(),
                if st.persistent {
                    "persistent"
                } else {
                    "transient"
                },
                st.chunk_size >> 10,
                st.exceptions,
                st.fraction_full() * 100.0,
                if st.valid { "" } else { ", INVALID" }
            );
            let dev: Arc<dyn BlockDevice> = files.device.clone();
            state.add_cow_node(&spec.id, Arc::new(files))?;
            Ok(dev)
        }
        Backing::Thin {
            name,
            size,
            snapshot_of,
            origin,
        } => {
            let thin = thin.ok_or(ServeError::NoPool)?;
            if !thin.exists(name) {
                match (size, snapshot_of, origin) {
                    (_, Some(origin), _) => {
                        thin.snapshot(origin, name)?;
                    }
                    (size, None, Some(origin)) => {
                        thin.create_with_origin(name, origin, *size)?;
                    }
                    (Some(size), None, None) => {
                        thin.create(name, *size)?;
                    }
                    (None, None, None) => return Err(ServeError::NoThinDevice(name.clone())),
                }
            }
            let dev = thin.device(name)?;
            info!("{}: thin device {name} ({} bytes)", spec.id, dev.size());
            Ok(dev)
        }
    }
}

/// QEMU options that attach the export at `socket`.
pub fn qemu_options(socket: &Path, queues: u16) -> String {
    format!(
        "-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
         -chardev socket,id=char0,path={} \
         -device vhost-user-blk-pci,chardev=char0,num-queues={queues}",
        socket.display()
    )
}

/// Opens the device of `spec` (creating a thin one if asked), makes it a node where it is
/// not a thin device, and starts its export. If the export does not start, the node made
/// for it is removed again, so that a later try (a SIGHUP reload) starts clean.
pub(crate) fn start_export(
    spec: &ExportSpec,
    pool: Option<&PoolLocation>,
    thin: Option<&Arc<Volumes>>,
    state: &Arc<State>,
) -> Result<(), ServeError> {
    let socket = match (&spec.socket, pool) {
        (Some(s), _) => s.clone(),
        (None, Some(loc)) => {
            let socket = loc.dir.join(format!("{}.sock", spec.id));
            dir_for(loc, &socket)?;
            socket
        }
        (None, None) => return Err(ServeError::NoSocket(spec.id.clone())),
    };
    let dev = open_device(spec, thin, state)?;
    if !matches!(spec.backing, Backing::Thin { .. } | Backing::Cow(_)) {
        state.add_node(
            &spec.id,
            Node {
                dev,
                read_only: spec.read_only,
            },
        )?;
    }
    let node = match &spec.backing {
        Backing::Thin { name, .. } => name.clone(),
        _ => spec.id.clone(),
    };
    let started = state.add_export(ExportConfig {
        id: spec.id.clone(),
        node,
        socket: socket.clone(),
        writable: !spec.read_only,
        settings: spec.settings,
        access: spec.access,
    });
    if let Err(source) = started {
        remove_node_of(spec, state);
        return Err(ServeError::Export {
            id: spec.id.clone(),
            source,
        });
    }
    let socket = absolute(&socket);
    println!("export {} at {}", spec.id, socket.display());
    let queues = spec.settings.num_queues;
    println!("  QEMU: {}", qemu_options(&socket, queues));
    println!(
        "  cloud-hypervisor: --memory size=1G,shared=on --disk vhost_user=on,socket={},num_queues={}",
        socket.display(),
        queues
    );
    Ok(())
}

/// Removes the node `start_export` made for `spec` (none for a thin device).
pub(crate) fn remove_node_of(spec: &ExportSpec, state: &State) {
    let removed = match spec.backing {
        Backing::Thin { .. } => return,
        Backing::Cow(_) => state.remove_cow_node(&spec.id).map(drop),
        Backing::Raw(_) | Backing::Null(_) | Backing::Rbd(_) => state.remove_node(&spec.id),
    };
    if let Err(e) = removed {
        log::warn!("node {}: {e}", spec.id);
    }
}

/// Starts every export and the control socket; they run until SIGINT or SIGTERM.
pub fn serve(config: ServeConfig) -> Result<(), ServeError> {
    fd_limit::raise_to_hard();
    // Before anything opens a file: sockets handed over by an upgrade keep their fd numbers.
    upgrade::at_start();
    let signals = crate::signals::block_termination().map_err(ServeError::Signals)?;
    // Dropped last: after the pool, on every way out.
    let _rbd_locks = rbd_pool::ReleaseLocksOnDrop;
    // A standby (`standby.rs`) opens the pool when told to take it over, not now.
    let standing_by = config
        .pool
        .as_ref()
        .filter(|loc| loc.rbd.as_ref().is_some_and(|r| r.standby))
        .filter(|_| !standby::owned_by_upgrade());
    if standing_by.is_some() && !crate::engine::rbd::AVAILABLE {
        return Err(rbd_pool::RbdPoolError::NotBuilt.into());
    }
    let thin = match standing_by {
        Some(_) => None,
        None => config.pool.as_ref().map(open_pool).transpose()?,
    };
    let state = State::new(thin);
    state.set_socket_defaults(config.socket_defaults);
    state.set_ceph(config.ceph.clone());
    let (now, later) = match standing_by {
        Some(_) => standby::split_exports(&config.exports),
        None => (config.exports.clone(), Vec::new()),
    };
    for spec in &now {
        start_export(spec, config.pool.as_ref(), state.thin(), &state)?;
    }
    match (standing_by, &config.pool) {
        (Some(loc), _) => {
            let waiting = standby::Standby::new(loc.clone(), later, config.nbd.is_some(), &state);
            state.set_standby(waiting);
            info!("standing by for the pool on RBD: QMP pool-take-over takes it over");
        }
        (None, Some(loc)) => {
            let saved = saved::SavedState::open(&loc.saved)?;
            restore::restore(&state, &saved);
            state.set_saved(saved);
        }
        (None, None) => {}
    }
    if let Some(addr) = &config.nbd {
        start_nbd(&state, addr, &now)?;
    }
    let _control = match &config.control {
        Some(path) => {
            if let Some(loc) = &config.pool {
                dir_for(loc, path)?;
            }
            let server = ControlServer::start_with(path, state.clone(), &config.control_access)
                .map_err(|source| ServeError::Control {
                    path: path.clone(),
                    source,
                })?;
            println!("control (QMP) at {}", absolute(path).display());
            Some(server)
        }
        None => None,
    };
    let _metrics = config
        .metrics
        .map(|addr| {
            let server = metrics::MetricsServer::start(addr, &state)
                .map_err(|source| ServeError::Metrics { addr, source })?;
            println!("metrics (Prometheus) at http://{}/metrics", server.addr());
            Ok::<_, ServeError>(server)
        })
        .transpose()?;
    crate::sockets::inherited::close_unclaimed();
    // Every socket listens (bound and listening before its export or server started).
    notify::ready(state.exports().len());
    let mut configured = config.exports.clone();
    let sig = loop {
        let sig = signals.wait().map_err(ServeError::Signals)?;
        if sig == libc::SIGUSR2 {
            // Returns only when the new binary was refused; then nothing stopped.
            let refused = upgrade::upgrade(&state, state.thin(), _control.as_ref());
            log::error!("upgrade refused: {refused}");
            continue;
        }
        if sig != libc::SIGHUP {
            break sig;
        }
        let Some(reread) = &config.reload else {
            info!("SIGHUP: no --config file to re-read; ignored");
            continue;
        };
        notify::reloading();
        match reread() {
            Ok(wanted) => {
                let env = reload::Env {
                    pool: config.pool.as_ref(),
                    thin: state.thin(),
                    state: &state,
                };
                configured = reload::apply(&env, &configured, wanted);
            }
            Err(e) => log::error!("SIGHUP: configuration not reloaded: {e}"),
        }
        notify::ready(state.exports().len());
    };
    info!("signal {sig}: stopping");
    notify::stopping();
    state.stop_all();
    if let Some(thin) = state.thin() {
        thin.pool().close();
    }
    rbd_pool::release_locks();
    Ok(())
}

/// Starts the NBD server of `--nbd` with a read-only export of each export's node.
fn start_nbd(
    state: &Arc<State>,
    addr: &crate::nbd::NbdAddr,
    exports: &[ExportSpec],
) -> Result<(), ServeError> {
    state.nbd().start(addr.clone()).map_err(ServeError::Nbd)?;
    for spec in exports {
        let device = match &spec.backing {
            Backing::Thin { name, .. } => name.clone(),
            _ => spec.id.clone(),
        };
        let cfg = nbd::NbdExportConfig {
            device,
            name: Some(spec.id.clone()),
            ..Default::default()
        };
        state.nbd().add(state, cfg).map_err(ServeError::Nbd)?;
    }
    let shown = match addr {
        crate::nbd::NbdAddr::Unix(p) => {
            format!("nbd+unix:///EXPORT?socket={}", absolute(p).display())
        }
        crate::nbd::NbdAddr::Tcp(a) => format!("nbd://{a}/EXPORT"),
    };
    println!("NBD at {addr} (read-only exports: {shown})");
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
