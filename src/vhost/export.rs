//! A running export: a socket that serves one frontend at a time, for as long as it is up.
//!
//! Each accepted frontend becomes a [`Connection`] (the device's I/O queues, fresh vrings and
//! worker threads) that owns everything of its session and releases it when the frontend goes
//! away, so a guest reboot or a VMM restart reconnects to the same export without a thinblk
//! restart, and a thousand reconnects leave no descriptor or thread behind. Between frontends
//! an export is one thread blocked in accept and one descriptor, its listening socket: a host
//! can keep hundreds of exports for VMs that are not running.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, info, warn};
use parking_lot::Mutex;

use super::backend::{BlkBackend, DeviceSettings};
use super::connection::{Connection, Ended};
use super::execute::FailureSink;
use super::handover::Member;
use super::memory_table::UnsealedMemory;
use crate::engine::BlockDevice;
use crate::sockets::{bind_private, SocketError};

/// An export being served on its own thread.
pub struct Export {
    socket: PathBuf,
    /// The listening socket, shared with the serving thread (not duplicated: one descriptor
    /// per export), to end a blocked accept at shutdown and to hand over.
    listener: Option<Arc<UnixListener>>,
    stopping: Arc<AtomicBool>,
    /// A handle on the socket of the frontend being served, if there is one, to end its
    /// session.
    connection: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
    backend: Arc<BlkBackend>,
    /// The listening socket went to another process (`hand_over`): leave it and its path be.
    handed_over: bool,
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
        let listener = Arc::new(listener);
        let accepting = listener.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut backend = BlkBackend::new(dev, settings).with_handover(handover);
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
            .spawn(move || serve(&name, &accepting, served, &stop, &conn))
            .map_err(|source| SocketError::Io {
                path: socket.display().to_string(),
                source,
            })?;
        Ok(Export {
            socket: socket.to_path_buf(),
            listener: Some(listener),
            stopping,
            connection,
            thread: Some(thread),
            backend,
            handed_over: false,
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

    /// Whether this export runs its device now (a frontend started its rings).
    pub fn active(&self) -> bool {
        self.backend.handover().active()
    }

    /// Stops serving without closing the listening socket, for a process that takes it over
    /// (a graceful upgrade): the frontend's session ends as after a crash, once every request
    /// it had in flight completed; no new one starts here. Returns the listening socket (a
    /// frontend connecting meanwhile waits in its backlog for the next process).
    pub fn hand_over(mut self) -> Option<UnixListener> {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(conn) = self.connection.lock().as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        // Wakes a blocked accept; the connection is dropped at once (the next process may
        // accept it too and sees it hang up).
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.handed_over = true;
        // The serving thread is joined: its reference is gone and this one is the last.
        self.listener.take().and_then(|l| Arc::try_unwrap(l).ok())
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
        if self.handed_over {
            return;
        }
        self.stopping.store(true, Ordering::SeqCst);
        // A connected frontend would keep the serving thread in its session for as long as it
        // likes: end the session (the frontend sees the socket close, as after a crash).
        if let Some(conn) = self.connection.lock().as_ref() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        // Shutting the listening socket down makes a blocked accept fail at once, even if the
        // socket's path has been removed; the serving loop then sees the flag and ends.
        if let Some(l) = &self.listener {
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
    listener: &UnixListener,
    backend: Arc<BlkBackend>,
    stopping: &AtomicBool,
    connection: &Mutex<Option<UnixStream>>,
) {
    while !stopping.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !stopping.load(Ordering::Acquire) {
                    error!("{name}: accepting a frontend failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
        };
        if stopping.load(Ordering::Acquire) {
            break;
        }
        // Memory that could still shrink is mapped (libblkio's memfds cannot be sealed, nor can
        // QEMU's memory-backend-file); SECURITY.md, "Guest memory", says what that risks.
        let session = match Connection::new(stream, &backend, UnsealedMemory::Accept) {
            Ok(s) => s,
            Err(e) => {
                error!("{name}: cannot serve a frontend: {e}");
                continue;
            }
        };
        // Published before `stopping` is read again: either `Drop` finds the handle, or this
        // thread sees the flag (the mutex orders the two).
        *connection.lock() = session.shutdown_handle().ok();
        if stopping.load(Ordering::SeqCst) {
            if let Some(s) = connection.lock().as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        } else {
            info!("{name}: frontend connected");
        }
        let ended = session.serve();
        *connection.lock() = None;
        match ended {
            Ended::HungUp => info!("{name}: frontend disconnected"),
            Ended::Refused(e) => warn!("{name}: connection closed: {e}"),
            Ended::MemoryTruncated => warn!(
                "{name}: connection closed: the frontend truncated its guest memory file \
                 under the daemon's mapping (SIGBUS caught; the pages read as zeros)"
            ),
        }
    }
}
