//! One device, several exports, one of them running: the handover of a disk between the
//! source and the destination of a live migration.
//!
//! The destination QEMU connects to its own export of the disk while the source still runs.
//! QEMU stops the source's rings (GET_VRING_BASE) at switchover and starts the destination's
//! after the guest state arrived, so in the ordinary flow the two never run together; this
//! makes sure of it, since both writing the disk at once would corrupt it.
//!
//! Every export of a device is a [`Member`] of the device's [`Handover`]. A member holds the
//! device while any of its rings runs: a queue worker calls [`Member::enter`] before it takes
//! requests (one relaxed load once its queue is in), and the queue leaves when the frontend
//! stops it ([`Member::leave`], from `stop_vring`, after the requests in flight are finished)
//! or its connection ends. The last queue to leave releases the device. A worker that finds
//! the device held by another export waits, without taking anything from its ring, until it is
//! released, its own ring is stopped or its connection ends; a long wait is logged.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use parking_lot::{Condvar, Mutex};

/// How often a waiting worker looks at its own ring and connection.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How long a wait goes before it is logged (and again each time as long).
const WAIT_WARNING: Duration = Duration::from_secs(10);

/// The running export of one device, if any.
#[derive(Debug, Default)]
pub struct Handover {
    holder: Mutex<Option<u64>>,
    /// When the last holder let go, for the log: the gap between the source's rings stopping
    /// and the destination's first request is part of a migration's downtime.
    released_at: Mutex<Option<Instant>>,
    released: Condvar,
    next_member: AtomicU64,
}

impl Handover {
    pub fn new() -> Arc<Handover> {
        Arc::new(Handover::default())
    }

    /// A new export of the device, named `name` in the log.
    pub fn member(self: &Arc<Self>, name: &str) -> Member {
        Member {
            handover: self.clone(),
            id: self.next_member.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            running: AtomicU32::new(0),
            closing: AtomicBool::new(false),
        }
    }
}

/// One export's claim on its device.
#[derive(Debug)]
pub struct Member {
    handover: Arc<Handover>,
    id: u64,
    name: String,
    /// The queues of this export that run requests; non-zero exactly while it holds the device.
    running: AtomicU32,
    /// The connection is ending: a waiting worker gives up.
    closing: AtomicBool,
}

impl Default for Member {
    /// The only export of a device of its own.
    fn default() -> Self {
        Handover::new().member("export")
    }
}

fn bit(queue: usize) -> u32 {
    1u32.checked_shl(u32::try_from(queue).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

impl Member {
    /// Before queue `queue` takes requests: whether it may. Takes the device if it is free,
    /// waits while another export holds it. `started` tells whether the frontend still has the
    /// ring started (it is asked under the lock `leave` takes, after the frontend marked the
    /// ring stopped, so a stopped ring never takes the device).
    pub fn enter(&self, queue: usize, started: &dyn Fn() -> bool) -> bool {
        let bit = bit(queue);
        if self.running.load(Ordering::Relaxed) & bit != 0 {
            return true;
        }
        let began = Instant::now();
        let mut warned = Duration::ZERO;
        let mut holder = self.handover.holder.lock();
        loop {
            if self.closing.load(Ordering::Acquire) || !started() {
                return false;
            }
            match *holder {
                Some(id) if id != self.id => {
                    let waited = began.elapsed();
                    if waited >= warned + WAIT_WARNING {
                        warned = waited;
                        warn!(
                            "{}: queue {queue} has waited {}s for another export of its device \
                             to stop its rings (a migration source that did not stop?)",
                            self.name,
                            waited.as_secs()
                        );
                    }
                    self.handover.released.wait_for(&mut holder, WAIT_SLICE);
                }
                _ => {
                    if holder.is_none() {
                        match self.handover.released_at.lock().take() {
                            Some(at) => info!(
                                "{}: now the running export of its device, {:.3} ms after \
                                 the last one stopped its rings (queue {queue} waited {:.3} ms)",
                                self.name,
                                at.elapsed().as_secs_f64() * 1e3,
                                began.elapsed().as_secs_f64() * 1e3
                            ),
                            None => info!("{}: now the running export of its device", self.name),
                        }
                    }
                    *holder = Some(self.id);
                    self.running.fetch_or(bit, Ordering::AcqRel);
                    return true;
                }
            }
        }
    }

    /// Queue `queue` stopped (its requests are finished); the last to stop releases the
    /// device.
    pub fn leave(&self, queue: usize) {
        let mut holder = self.handover.holder.lock();
        let before = self.running.fetch_and(!bit(queue), Ordering::AcqRel);
        if before != 0 && before & !bit(queue) == 0 && *holder == Some(self.id) {
            *holder = None;
            *self.handover.released_at.lock() = Some(Instant::now());
            info!(
                "{}: rings stopped; the device is free for another export",
                self.name
            );
            self.handover.released.notify_all();
        }
    }

    /// The connection ends: waiting workers give up (until [`Member::reopen`]).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let _holder = self.handover.holder.lock();
        self.handover.released.notify_all();
    }

    /// A new connection may wait again.
    pub fn reopen(&self) {
        self.closing.store(false, Ordering::Release);
    }

    /// Whether this export holds its device (has started rings).
    pub fn active(&self) -> bool {
        *self.handover.holder.lock() == Some(self.id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn a_second_export_runs_only_after_the_first_stopped_all_its_rings() {
        let device = Handover::new();
        let source = Arc::new(device.member("source"));
        let dest = Arc::new(device.member("destination"));
        let yes = || true;
        assert!(source.enter(0, &yes) && source.enter(1, &yes));
        assert!(source.active() && !dest.active());

        let entered = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (dest, entered) = (dest.clone(), entered.clone());
            std::thread::spawn(move || {
                let ok = dest.enter(0, &|| true);
                entered.store(true, Ordering::SeqCst);
                ok
            })
        };
        std::thread::sleep(Duration::from_millis(150));
        assert!(!entered.load(Ordering::SeqCst), "ran beside the source");
        source.leave(0);
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            !entered.load(Ordering::SeqCst),
            "one source ring still runs"
        );
        source.leave(1);
        assert!(waiter.join().unwrap());
        assert!(dest.active() && !source.active());

        // Back again (A -> B -> A): the source waits for the destination in turn.
        dest.leave(0);
        assert!(source.enter(0, &yes) && source.active());
    }

    #[test]
    fn a_stopped_ring_or_a_closing_connection_gives_up_the_wait() {
        let device = Handover::new();
        let source = device.member("source");
        let dest = Arc::new(device.member("destination"));
        assert!(source.enter(0, &|| true));
        assert!(!dest.enter(0, &|| false), "a stopped ring takes nothing");
        let waiter = {
            let dest = dest.clone();
            std::thread::spawn(move || dest.enter(0, &|| true))
        };
        std::thread::sleep(Duration::from_millis(100));
        dest.close();
        assert!(!waiter.join().unwrap());
        assert!(source.active());
        dest.reopen();
        source.leave(0);
        assert!(dest.enter(0, &|| true));
    }

    #[test]
    fn leaving_a_queue_that_never_ran_releases_nothing() {
        let device = Handover::new();
        let a = device.member("a");
        let b = device.member("b");
        assert!(a.enter(0, &|| true));
        b.leave(0);
        a.leave(1);
        assert!(a.active());
    }
}
