//! One vhost-user connection, from accept to hang-up: the one object that owns everything the
//! frontend sent (its socket, memory region fds and mappings, kick/call/err eventfds, the
//! backend channel) and everything created for it (vrings, the device's I/O queues, the event
//! loops with their epoll and eventfds: one per queue, at most one per pool worker, each
//! attached to one of the daemon's queue workers, `worker_pool.rs`). [`Connection::serve`]
//! consumes it, so when the frontend goes away every loop is detached from its worker (no
//! worker is inside it, nor will be) and all of it is closed before the export accepts the
//! next frontend; an export without a frontend holds nothing but its listening socket.
//!
//! If the frontend truncates a guest memory file the daemon mapped, the SIGBUS handler
//! (`sigbus.rs`) puts zero pages where the file's pages were and marks the connection; the
//! serve loop sees the mark within [`POISON_CHECK`] and ends the session, so the frontend loses
//! its disk and nothing else happens to the daemon.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::warn;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vhost_user_backend::{VhostUserBackend, VhostUserHandler};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use super::backend::BlkBackend;
use super::dirty_log::GuestMemoryMmap;
use super::frontend_checks::Checked;
use super::guest_memory_guard::GuestMemoryGuard;
use super::memory_table::UnsealedMemory;
use super::sigbus;
use super::worker_pool;

/// How long a truncated memory file can go unnoticed by the serve loop while the frontend
/// sends no message.
pub const POISON_CHECK: Duration = Duration::from_millis(100);

type Requests = BackendReqHandler<Mutex<Checked<VhostUserHandler<Arc<BlkBackend>>>>>;

/// A frontend being served.
pub struct Connection {
    /// Declared before `requests`: the loops are detached before the handler they belong to
    /// is dropped.
    attached: Vec<worker_pool::Attachment>,
    requests: Requests,
    backend: Arc<BlkBackend>,
    memory: MemoryOwner,
}

/// The connection's id in the SIGBUS table; its entries are freed when this is dropped, which
/// [`Connection::serve`] does only after nothing can touch the connection's memory any more.
struct MemoryOwner(u64);

impl Drop for MemoryOwner {
    fn drop(&mut self) {
        sigbus::table().release_owner(self.0);
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The frontend hung up (or the connection was shut down).
    HungUp,
    /// A request was malformed or refused; the connection was closed after any error reply.
    Refused(VhostUserError),
    /// The frontend's guest memory file shrank under a mapping the daemon touched (SIGBUS);
    /// the connection was closed.
    MemoryTruncated,
}

impl Connection {
    /// Sets up a fresh device state for the frontend on `stream`: the device's I/O queues,
    /// vrings and worker threads, each worker watching the completions of its queues.
    pub fn new(
        stream: UnixStream,
        backend: &Arc<BlkBackend>,
        unsealed: UnsealedMemory,
    ) -> io::Result<Connection> {
        // Opened for this frontend and closed when it goes (`serve`), or now if the setup
        // fails (its workers are joined by then: the handler is dropped on the way out).
        backend.open_queues();
        let set_up = Self::set_up(stream, backend, unsealed);
        if set_up.is_err() {
            backend.close_queues();
        }
        set_up
    }

    fn set_up(
        stream: UnixStream,
        backend: &Arc<BlkBackend>,
        unsealed: UnsealedMemory,
    ) -> io::Result<Connection> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let memory = MemoryOwner(sigbus::new_owner());
        let guard = GuestMemoryGuard::new(mem.clone(), memory.0)?;
        let handler = VhostUserHandler::without_threads(backend.clone(), mem)
            .map_err(|e| io::Error::other(format!("cannot create the vhost-user handler: {e}")))?;
        let workers = handler.get_epoll_handlers();
        for queue in 0..backend.num_queues() {
            let (Some(fd), Some(worker)) = (
                backend.completion_fd(queue),
                workers.get(backend.worker_of(queue)),
            ) else {
                continue;
            };
            let id = u64::from(backend.completion_event(queue));
            worker.register_listener(fd, EventSet::IN, id)?;
        }
        // Each loop goes to a pool worker once its completion fds are in its epoll.
        let mut attached = Vec::with_capacity(workers.len());
        for (index, worker) in workers.into_iter().enumerate() {
            let queues = (0..backend.num_queues())
                .filter(|&q| backend.worker_of(q) == index)
                .count();
            let fd = worker.as_raw_fd();
            let run = move || match worker.run_ready() {
                Ok(_) => true,
                Err(e) => {
                    warn!("queue loop {index} stopped: {e}");
                    false
                }
            };
            attached.push(worker_pool::attach(fd, queues, Box::new(run))?);
        }
        let max_queue_size = u32::try_from(backend.max_queue_size()).unwrap_or(u32::MAX);
        let checked = Checked::new(handler, max_queue_size, unsealed)
            .map_err(|e| io::Error::other(format!("cannot set up request checks: {e}")))?
            .guard_memory(guard)
            .track_inflight(backend.inflight().clone(), queue_count(backend));
        Ok(Connection {
            attached,
            requests: BackendReqHandler::from_stream(stream, Arc::new(Mutex::new(checked))),
            backend: backend.clone(),
            memory,
        })
    }

    /// A second handle on the connection's socket: shutting it down ends [`Connection::serve`]
    /// (the frontend sees the socket close, as after a crash).
    pub fn shutdown_handle(&self) -> io::Result<UnixStream> {
        self.requests.try_clone_connection()
    }

    /// Handles requests until the frontend hangs up or sends one that is refused, then
    /// releases everything the connection holds.
    pub fn serve(self) -> Ended {
        let Connection {
            attached,
            mut requests,
            backend,
            memory,
        } = self;
        let mut caught = 0;
        let ended = loop {
            let now = sigbus::caught();
            if now != caught {
                caught = now;
                if sigbus::table().poisoned(memory.0) {
                    break Ended::MemoryTruncated;
                }
            }
            match readable(&requests, POISON_CHECK) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => break Ended::Refused(VhostUserError::SocketBroken(e)),
            }
            match requests.handle_request() {
                Ok(()) => {}
                Err(
                    VhostUserError::Disconnected
                    | VhostUserError::PartialMessage
                    | VhostUserError::SocketBroken(_),
                ) => break Ended::HungUp,
                Err(e) => break Ended::Refused(e),
            }
        };
        // A worker waiting for its device's turn (handover.rs) would keep the detach below
        // waiting.
        backend.handover().close();
        // No pool worker is inside the connection's loops after this, nor will be.
        drop(attached);
        // The socket, the handler (its loops, closing the vrings' fds) and the memory table
        // the handler holds.
        drop(requests);
        // Requests the workers handed to their device queue and did not see complete still
        // hold their vring (with its kick and call fds) and the memory they point into: finish
        // them now, as a GET_VRING_BASE would have.
        for queue in 0..backend.num_queues() {
            if let Err(e) = backend.stop_vring(u32::try_from(queue).unwrap_or(u32::MAX)) {
                warn!("queue {queue}: requests in flight at the hang-up failed: {e}");
            }
        }
        // Nothing is in flight any more: the device's queues (rings, eventfds, threads) go
        // with the frontend.
        backend.close_queues();
        // Every chain taken is returned now: the frontend keeps the inflight region (all
        // clear) for the next backend, and this one lets go of it.
        backend.inflight().detach();
        // The backend keeps the last memory table for its workers; the workers are gone, so
        // let go of the mappings and the region fds behind them.
        let _ = backend.update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
        backend.frontend_gone();
        // Only now is none of the connection's guest memory mapped.
        drop(memory);
        ended
    }
}

fn queue_count(backend: &BlkBackend) -> u16 {
    u16::try_from(backend.num_queues()).unwrap_or(u16::MAX)
}

/// Waits up to `timeout` for the frontend's socket to have something to read (or to hang up).
fn readable(socket: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll reads and writes one pollfd we own; the socket stays open meanwhile.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

/// Serves one frontend on `stream` from its first message to its hang-up, with every check a
/// thinblk export makes, and releases everything before returning. For tests and fuzzing of the
/// message stream: an export uses [`Connection`] so that it can end a session early.
pub fn serve_stream(stream: UnixStream, backend: &Arc<BlkBackend>) -> io::Result<Ended> {
    Ok(Connection::new(stream, backend, UnsealedMemory::Accept)?.serve())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::engine::memory::MemoryDevice;
    use crate::vhost::backend::DeviceSettings;

    fn backend() -> Arc<BlkBackend> {
        let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let settings = DeviceSettings {
            serial: "stream".into(),
            num_queues: 2,
            queue_size: 16,
            read_only: false,
            poll: std::time::Duration::ZERO,
            submit_batch: 4,
        };
        Arc::new(BlkBackend::new(dev, settings))
    }

    fn request(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for w in [code, flags, payload.len() as u32] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn serve_stream_answers_until_the_hang_up_and_joins_its_workers() {
        let b = backend();
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        let served = b.clone();
        let t = std::thread::spawn(move || serve_stream(ours, &served));
        frontend.write_all(&request(1, 1, &[])).unwrap(); // GET_FEATURES
        let mut reply = [0u8; 20];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &1u32.to_le_bytes());
        assert_eq!(&reply[8..12], &8u32.to_le_bytes());
        drop(frontend);
        assert!(matches!(t.join().unwrap().unwrap(), Ended::HungUp));
        // Nothing of the session holds the backend any more: the workers are joined.
        assert_eq!(Arc::strong_count(&b), 1);
    }

    #[test]
    fn a_malformed_message_ends_the_session_with_the_reason() {
        let b = backend();
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        let served = b.clone();
        let t = std::thread::spawn(move || serve_stream(ours, &served));
        // SET_VRING_NUM 3 for queue 0: refused by the checks.
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&3u32.to_le_bytes());
        frontend.write_all(&request(8, 1, &p)).unwrap();
        assert!(matches!(t.join().unwrap().unwrap(), Ended::Refused(_)));
        assert_eq!(Arc::strong_count(&b), 1);
    }
}
