//! A running export: a socket that serves one frontend at a time, for as long as it is up.
//!
//! The daemon's accept thread (`accept_loop.rs`) watches every export's listening socket; a
//! frontend that connects gets a thread of its own for its vhost-user messages, and becomes a
//! [`Connection`] (the device's I/O queues, fresh vrings and their event loops on the daemon's
//! queue workers, `worker_pool.rs`) that owns everything of its session and releases it when
//! the frontend goes away, so a guest reboot or a VMM restart reconnects to the same export
//! without a thinblk restart, and a thousand reconnects leave no descriptor or thread behind.
//! Between frontends an export is one descriptor, its listening socket, and no thread: a host
//! can keep hundreds of exports for VMs that are not running.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use log::{error, info, warn};
use parking_lot::Mutex;

use super::accept_loop::{self, Rearm};
use super::backend::{BlkBackend, DeviceSettings};
use super::connection::{Connection, Ended};
use super::execute::FailureSink;
use super::handover::Member;
use super::memory_table::UnsealedMemory;
use super::worker_pool;
use crate::engine::BlockDevice;
use crate::sockets::{bind_private, SocketError};

/// A running export.
pub struct Export {
    socket: PathBuf,
    /// `None` once stopped (dropped or handed over).
    shared: Option<Arc<Shared>>,
    /// The listening socket watched by the accept thread; `None` once stopped.
    watch: Option<accept_loop::Attachment>,
    /// The listening socket went to another process (`hand_over`): leave it and its path be.
    handed_over: bool,
}

/// What the accept thread and the session's thread use.
struct Shared {
    name: String,
    /// Non-blocking: the accept thread takes what is there and goes on.
    listener: UnixListener,
    backend: Arc<BlkBackend>,
    stopping: AtomicBool,
    /// A handle on the socket of the frontend being served, if there is one, to end its
    /// session.
    connection: Mutex<Option<UnixStream>>,
    /// The thread serving the frontend, if one connected since the export started.
    session: Mutex<Option<JoinHandle<()>>>,
    /// Watches the listening socket again, for the next frontend; set before it is first
    /// watched.
    rearm: OnceLock<Rearm>,
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
        Self::start_on(
            dev,
            settings,
            socket,
            bind_private(socket)?,
            on_failure,
            Member::default(),
        )
    }

    /// [`Export::start_with`] on a socket the caller bound at `socket` (with the owner,
    /// group and mode it chose), as one of several exports of a device of which one at a time
    /// runs (`handover.rs`; `Member::default()` for the only one).
    pub fn start_on(
        dev: Arc<dyn BlockDevice>,
        settings: DeviceSettings,
        socket: &Path,
        listener: UnixListener,
        on_failure: Option<FailureSink>,
        handover: Member,
    ) -> Result<Export, SocketError> {
        let io_error = |source| SocketError::Io {
            path: socket.display().to_string(),
            source,
        };
        worker_pool::start();
        listener.set_nonblocking(true).map_err(io_error)?;
        let mut backend = BlkBackend::new(dev, settings).with_handover(handover);
        if let Some(sink) = on_failure {
            backend = backend.with_failure_sink(sink);
        }
        let shared = Arc::new(Shared {
            name: socket.display().to_string(),
            listener,
            backend: Arc::new(backend),
            stopping: AtomicBool::new(false),
            connection: Mutex::new(None),
            session: Mutex::new(None),
            rearm: OnceLock::new(),
        });
        let accepting = shared.clone();
        let watch = accept_loop::watch(shared.listener.as_raw_fd(), |rearm| {
            // Before the socket is watched: a frontend already in its backlog (the probe of
            // a supervisor, say) may be accepted, served and gone before `watch` returns.
            let _ = accepting.rearm.set(rearm);
            Box::new(move || {
                accept(&accepting);
                true
            })
        })
        .map_err(io_error)?;
        Ok(Export {
            socket: socket.to_path_buf(),
            shared: Some(shared),
            watch: Some(watch),
            handed_over: false,
        })
    }

    /// Tells the connected frontend, if any, that the device's config space changed (its
    /// size). The frontend acks from its own event loop, so this runs on a thread of its own
    /// and only logs the outcome.
    pub fn config_changed(&self) {
        let Some(backend) = self.shared.as_ref().map(|s| s.backend.clone()) else {
            return;
        };
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

    /// Whether this export runs its device now (a frontend started its rings).
    pub fn active(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.backend.handover().active())
    }

    /// Stops serving without closing the listening socket, for a process that takes it over
    /// (a graceful upgrade): the frontend's session ends as after a crash, once every request
    /// it had in flight completed; no new one starts here. Returns the listening socket (a
    /// frontend connecting meanwhile waits in its backlog for the next process).
    pub fn hand_over(mut self) -> Option<UnixListener> {
        self.handed_over = true;
        let shared = self.stop()?;
        // The accept callback and the session's thread are gone: this reference is the last.
        let listener = Arc::try_unwrap(shared).ok()?.listener;
        // The next process gets the socket as it was bound.
        if let Err(e) = listener.set_nonblocking(false) {
            warn!("{}: {e}", self.socket.display());
        }
        Some(listener)
    }

    /// Ends the session, if any, and stops watching the listening socket; returns once
    /// nothing of the export runs any more.
    fn stop(&mut self) -> Option<Arc<Shared>> {
        let shared = self.shared.take()?;
        shared.stopping.store(true, Ordering::SeqCst);
        // A connected frontend would keep its session for as long as it likes: end it (the
        // frontend sees the socket close, as after a crash).
        if let Some(conn) = shared.connection.lock().as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        // Waits for an accept in progress; none starts after.
        drop(self.watch.take());
        // The session (if one started) sees the flag once it published its socket (`serve`).
        let session = shared.session.lock().take();
        if let Some(t) = session {
            let _ = t.join();
        }
        Some(shared)
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        drop(self.stop());
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// On the accept thread, when the listening socket is readable: starts serving the frontend
/// waiting there on a thread of its own, or watches the socket again if there is none.
fn accept(shared: &Arc<Shared>) {
    let rearm = || {
        if let Some(r) = shared.rearm.get() {
            r.rearm();
        }
    };
    if shared.stopping.load(Ordering::Acquire) {
        return;
    }
    let stream = match shared.listener.accept() {
        Ok((stream, _)) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return rearm(),
        Err(e) => {
            error!("{}: accepting a frontend failed: {e}", shared.name);
            // Out of descriptors, say: try again later rather than at once and forever
            // (every export waits that long, as the shortage is the daemon's).
            std::thread::sleep(std::time::Duration::from_millis(100));
            return rearm();
        }
    };
    // The previous session ended (the socket is watched again only then): reap its thread.
    let previous = shared.session.lock().take();
    if let Some(previous) = previous {
        let _ = previous.join();
    }
    let serving = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("export".into())
        .spawn(move || serve(&serving, stream));
    match spawned {
        Ok(t) => *shared.session.lock() = Some(t),
        Err(e) => {
            error!("{}: cannot start serving a frontend: {e}", shared.name);
            rearm();
        }
    }
}

/// Serves one frontend, then watches the listening socket again for the next.
fn serve(shared: &Shared, stream: UnixStream) {
    let name = &shared.name;
    session(shared, stream);
    if !shared.stopping.load(Ordering::Acquire) {
        // Set before the socket was first watched (`start_on`), so before this session began.
        if let Some(r) = shared.rearm.get() {
            r.rearm();
        } else {
            error!("{name}: the listening socket is not watched; no frontend can connect");
        }
    }
}

fn session(shared: &Shared, stream: UnixStream) {
    let name = &shared.name;
    // Memory that could still shrink is mapped (libblkio's memfds cannot be sealed, nor can
    // QEMU's memory-backend-file); SECURITY.md, "Guest memory", says what that risks.
    let session = match Connection::new(stream, &shared.backend, UnsealedMemory::Accept) {
        Ok(s) => s,
        Err(e) => {
            error!("{name}: cannot serve a frontend: {e}");
            return;
        }
    };
    // Published before `stopping` is read again: either `stop` finds the handle, or this
    // thread sees the flag (the mutex orders the two).
    *shared.connection.lock() = session.shutdown_handle().ok();
    if shared.stopping.load(Ordering::SeqCst) {
        if let Some(s) = shared.connection.lock().as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    } else {
        info!("{name}: frontend connected");
    }
    let ended = session.serve();
    *shared.connection.lock() = None;
    match ended {
        Ended::HungUp => info!("{name}: frontend disconnected"),
        Ended::Refused(e) => warn!("{name}: connection closed: {e}"),
        Ended::MemoryTruncated => warn!(
            "{name}: connection closed: the frontend truncated its guest memory file \
             under the daemon's mapping (SIGBUS caught; the pages read as zeros)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    use super::*;
    use crate::engine::memory::MemoryDevice;

    fn settings() -> DeviceSettings {
        DeviceSettings {
            serial: "t".into(),
            num_queues: 1,
            queue_size: 64,
            read_only: false,
            poll: Duration::ZERO,
            submit_batch: 32,
        }
    }

    /// A supervisor's probe that connected and left before the export started is accepted,
    /// served and gone at once, possibly before `start_on` returns; the export must accept
    /// the next frontend all the same (a CI run once hung on a lost race here). Repeated,
    /// as the loss needed the probe's session to end first.
    #[test]
    fn a_frontend_after_an_early_probe_is_served() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..50 {
            let path = dir.path().join(format!("s{round}"));
            let listener = UnixListener::bind(&path).unwrap();
            drop(UnixStream::connect(&path).unwrap());
            let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
            let export =
                Export::start_on(dev, settings(), &path, listener, None, Member::default())
                    .unwrap();
            // The frontend retries a read that timed out, so it asks on a thread of its own.
            let stream = UnixStream::connect(&path).unwrap();
            let (answered, answer) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let fe = Frontend::from_stream(stream, 1);
                let _ = answered.send(fe.get_features().is_ok());
            });
            assert_eq!(
                answer.recv_timeout(Duration::from_secs(20)),
                Ok(true),
                "round {round}: the export never served the frontend after the probe"
            );
            drop(export);
        }
    }
}
