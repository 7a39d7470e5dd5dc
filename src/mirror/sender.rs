//! The thread of a queued `CopyStream` that sends the pieces read from the source to the
//! target, so the job's thread goes on walking the allocation and starting reads while a
//! send waits for room in the target's window. On one thread, reading and sending took
//! turns: the time spent waiting for reads and the time spent sending added up (0.2-0.7 s
//! and 0.6-1.0 s of a 1.3-1.6 s copy in the bench).
//!
//! Buffers go to the thread with their piece and come back once sent; until then they count
//! against the stream's read window (`QueuedReads::give_back`), which so bounds the bytes
//! read and not yet on the wire.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::copy::Batch;
use super::reads::aligned;
use super::MirrorError;
use crate::nbd::client::{Command, NbdClient};

/// A piece to send: its offset, its buffer and length (the data is `aligned(buffer, len)`).
type Piece = (u64, Vec<u8>, usize);

#[derive(Default)]
struct Shared {
    /// Bytes sent since the job's thread last asked (its progress).
    sent: AtomicU64,
    /// Time spent sending, waits for room in the target's window included.
    send_ns: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<MirrorError>>,
}

pub struct PieceSender {
    tx: Option<mpsc::Sender<Piece>>,
    back: mpsc::Receiver<(Vec<u8>, usize)>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl PieceSender {
    pub fn start(target: Arc<NbdClient>, batch: Arc<Batch>) -> std::io::Result<PieceSender> {
        let (tx, rx) = mpsc::channel::<Piece>();
        let (back_tx, back) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let me = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mirror-send".into())
            .spawn(move || {
                for (at, mut storage, len) in rx {
                    // After a failure the pieces only go back: the copy is stopping.
                    if !me.failed.load(Ordering::Acquire) {
                        let t = Instant::now();
                        let data = aligned(&mut storage, len);
                        let cmd = Command::Write {
                            offset: at,
                            data,
                            fua: false,
                        };
                        match batch.submit(&target, cmd) {
                            Ok(()) => {
                                me.sent.fetch_add(len as u64, Ordering::Relaxed);
                            }
                            Err(e) => {
                                me.error.lock().get_or_insert(e);
                                me.failed.store(true, Ordering::Release);
                            }
                        }
                        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        me.send_ns.fetch_add(ns, Ordering::Relaxed);
                    }
                    if back_tx.send((storage, len)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(PieceSender {
            tx: Some(tx),
            back,
            shared,
            thread: Some(thread),
        })
    }

    /// The first send that failed, once; later calls fail too.
    pub fn check(&self) -> Result<(), MirrorError> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(self.shared.error.lock().take().unwrap_or_else(|| {
            MirrorError::Io(std::io::Error::other("a send to the target failed earlier"))
        }))
    }

    /// Hands a piece to the thread.
    pub fn send(&self, at: u64, storage: Vec<u8>, len: usize) -> Result<(), MirrorError> {
        self.check()?;
        let gone = || MirrorError::Io(std::io::Error::other("the mirror's sender stopped"));
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        tx.send((at, storage, len)).map_err(|_| gone())
    }

    /// A buffer that was sent, if one is back.
    pub fn try_back(&self) -> Option<(Vec<u8>, usize)> {
        self.back.try_recv().ok()
    }

    /// Waits for a buffer to come back; `None` if the thread ended.
    pub fn wait_back(&self) -> Option<(Vec<u8>, usize)> {
        self.back.recv().ok()
    }

    /// Bytes sent since the last call.
    pub fn take_sent(&self) -> u64 {
        self.shared.sent.swap(0, Ordering::Relaxed)
    }

    pub fn send_time(&self) -> Duration {
        Duration::from_nanos(self.shared.send_ns.load(Ordering::Relaxed))
    }
}

impl Drop for PieceSender {
    fn drop(&mut self) {
        // The thread ends once the pieces handed to it were sent (or given up).
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
