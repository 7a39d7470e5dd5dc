//! One vhost-user connection, from accept to hang-up: the one object that owns everything the
//! frontend sent (its socket, memory region fds and mappings, kick/call/err eventfds, the
//! backend channel) and everything created for it (vrings, one worker thread per queue with
//! its epoll and exit eventfds). [`Connection::serve`] consumes it, so when the frontend goes
//! away all of it is closed and every worker is joined before the export accepts the next
//! frontend.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::warn;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vhost_user_backend::{VhostUserBackend, VhostUserHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::backend::BlkBackend;
use super::frontend_checks::Checked;
use super::memory_table::UnsealedMemory;

type Requests = BackendReqHandler<Mutex<Checked<VhostUserHandler<Arc<BlkBackend>>>>>;

/// A frontend being served.
pub struct Connection {
    requests: Requests,
    backend: Arc<BlkBackend>,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The frontend hung up (or the connection was shut down).
    HungUp,
    /// A request was malformed or refused; the connection was closed after any error reply.
    Refused(VhostUserError),
}

impl Connection {
    /// Sets up a fresh device state for the frontend on `stream`: vrings and worker threads,
    /// each worker watching its queue's io_uring completions.
    pub fn new(
        stream: UnixStream,
        backend: &Arc<BlkBackend>,
        unsealed: UnsealedMemory,
    ) -> io::Result<Connection> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let handler = VhostUserHandler::new(backend.clone(), mem)
            .map_err(|e| io::Error::other(format!("cannot create the vhost-user handler: {e}")))?;
        for (queue, worker) in handler.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.completion_fd(queue) {
                let id = u64::from(backend.completion_event());
                worker.register_listener(fd, EventSet::IN, id)?;
            }
        }
        let max_queue_size = u32::try_from(backend.max_queue_size()).unwrap_or(u32::MAX);
        let checked = Checked::new(handler, max_queue_size, unsealed)
            .map_err(|e| io::Error::other(format!("cannot set up request checks: {e}")))?;
        Ok(Connection {
            requests: BackendReqHandler::from_stream(stream, Arc::new(Mutex::new(checked))),
            backend: backend.clone(),
        })
    }

    /// A second handle on the connection's socket: shutting it down ends [`Connection::serve`]
    /// (the frontend sees the socket close, as after a crash).
    pub fn shutdown_handle(&self) -> io::Result<UnixStream> {
        self.requests.try_clone_connection()
    }

    /// Handles requests until the frontend hangs up or sends one that is refused, then
    /// releases everything the connection holds.
    pub fn serve(mut self) -> Ended {
        let ended = loop {
            match self.requests.handle_request() {
                Ok(()) => {}
                Err(
                    VhostUserError::Disconnected
                    | VhostUserError::PartialMessage
                    | VhostUserError::SocketBroken(_),
                ) => break Ended::HungUp,
                Err(e) => break Ended::Refused(e),
            }
        };
        let backend = self.backend.clone();
        // The socket, the handler (which stops and joins its workers, closing the vrings' fds)
        // and the memory table the handler holds.
        drop(self);
        // Requests the workers handed to a queue's io_uring and did not see complete still
        // hold their vring (with its kick and call fds) and the memory they point into: finish
        // them now, as a GET_VRING_BASE would have.
        for queue in 0..backend.num_queues() {
            if let Err(e) = backend.stop_vring(u32::try_from(queue).unwrap_or(u32::MAX)) {
                warn!("queue {queue}: requests in flight at the hang-up failed: {e}");
            }
        }
        // The backend keeps the last memory table for its workers; the workers are gone, so
        // let go of the mappings and the region fds behind them.
        let _ = backend.update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
        backend.frontend_gone();
        ended
    }
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
