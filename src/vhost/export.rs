//! A running export: a socket that serves one frontend at a time, for as long as it is up.
//!
//! Each connection gets a fresh vhost-user daemon (fresh vrings and worker threads), so a
//! guest reboot or a VMM restart reconnects to the same export without a thinblk restart.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, info, warn};
use parking_lot::Mutex;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::backend::{BlkBackend, DeviceSettings};
use super::execute::FailureSink;
use crate::engine::BlockDevice;
use crate::sockets::{bind_private, SocketError};

/// An export being served on its own thread.
pub struct Export {
    socket: PathBuf,
    /// A duplicate of the listening socket, to end a blocked accept at shutdown.
    wake: Option<UnixListener>,
    stopping: Arc<AtomicBool>,
    /// Ends the connection of the frontend being served, if there is one.
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    backend: Arc<BlkBackend>,
}

impl Export {
    /// Binds `socket` and starts serving `dev` on it.
    pub fn start(
        dev: Arc<dyn BlockDevice>,
        settings: DeviceSettings,
        socket: &Path,
    ) -> Result<Export, SocketError> {
        Self::start_with(dev, settings, socket, None)
    }

    /// [`Export::start`], telling `on_failure` of every request that fails.
    pub fn start_with(
        dev: Arc<dyn BlockDevice>,
        settings: DeviceSettings,
        socket: &Path,
        on_failure: Option<FailureSink>,
    ) -> Result<Export, SocketError> {
        let listener = bind_private(socket)?;
        let wake = listener.try_clone().ok();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut backend = BlkBackend::new(dev, settings);
        if let Some(sink) = on_failure {
            backend = backend.with_failure_sink(sink);
        }
        let backend = Arc::new(backend);
        let name = socket.display().to_string();
        let stop = stopping.clone();
        let served = backend.clone();
        let connection = Arc::new(Mutex::new(None));
        let conn = connection.clone();
        let thread = std::thread::Builder::new()
            .name("export".into())
            .spawn(move || serve(&name, listener, served, &stop, &conn))
            .map_err(|source| SocketError::Io {
                path: socket.display().to_string(),
                source,
            })?;
        Ok(Export {
            socket: socket.to_path_buf(),
            wake,
            stopping,
            connection,
            thread: Some(thread),
            backend,
        })
    }

    /// Tells the connected frontend, if any, that the device's config space changed (its
    /// size). The frontend acks from its own event loop, so this runs on a thread of its own
    /// and only logs the outcome.
    pub fn config_changed(&self) {
        let backend = self.backend.clone();
        let name = self.socket.display().to_string();
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name("config-change".into())
            .spawn(move || match backend.notify_config_change() {
                Ok(true) => info!("{name}: told the frontend the config changed"),
                Ok(false) => {
                    info!("{name}: no frontend channel; the change shows at the next connection")
                }
                Err(e) => warn!("{name}: cannot tell the frontend the config changed: {e}"),
            });
        if let Err(e) = spawned {
            warn!("{thread_name}: cannot start the config-change thread: {e}");
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Blocks until the export stops (it does not stop on its own).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // A connected frontend would keep the serving thread in its session for as long as it
        // likes: end the session (the frontend sees the socket close, as after a crash).
        if let Some(conn) = self.connection.lock().as_ref() {
            conn.shutdown();
        }
        // Shutting the listening socket down makes a blocked accept fail at once, even if the
        // socket's path has been removed; the serving loop then sees the flag and ends.
        if let Some(l) = &self.wake {
            // SAFETY: shutdown on a descriptor this struct owns; no memory is involved.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(
    name: &str,
    listener: UnixListener,
    backend: Arc<BlkBackend>,
    stopping: &AtomicBool,
    connection: &Mutex<Option<ShutdownHandle>>,
) {
    let mut listener = Listener::from(listener);
    while !stopping.load(Ordering::Acquire) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.to_string(), backend.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                error!("{name}: cannot create the vhost-user daemon: {e}");
                return;
            }
        };
        for (queue, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.completion_fd(queue) {
                let id = u64::from(backend.completion_event());
                if let Err(e) = handler.register_listener(fd, EventSet::IN, id) {
                    error!("{name}: cannot watch queue {queue}'s completions: {e}");
                    return;
                }
            }
        }
        if let Err(e) = daemon.start(&mut listener) {
            if !stopping.load(Ordering::Acquire) {
                error!("{name}: accepting a frontend failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        // Published before `stopping` is read again: either `Drop` finds the handle, or this
        // thread sees the flag (the mutex orders the two).
        *connection.lock() = daemon.shutdown_handle();
        if stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            info!("{name}: frontend connected");
        }
        let ended = daemon.wait();
        *connection.lock() = None;
        match ended {
            Ok(()) => info!("{name}: frontend disconnected"),
            Err(e) => info!("{name}: connection ended: {e}"),
        }
        backend.frontend_gone();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
    }
}
