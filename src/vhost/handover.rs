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
//! or its connection ends. The last queue to leave releases the device.
//!
//! A queue that finds the device held by another export takes nothing from its ring and is
//! told no at once: its worker is one of the daemon's shared queue workers (`worker_pool.rs`),
//! and waiting there would stop every other disk that worker serves, for as long as the other
//! export likes. The queue leaves a waker instead, which the release calls (it kicks the
//! queue, so its worker comes back to it); its ring stopping or its connection ending takes
//! the waker back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};
use parking_lot::Mutex;

/// What a waiting queue leaves to be called when the device is free.
pub type Waker = Box<dyn FnOnce() + Send>;

/// The running export of one device, if any.
#[derive(Debug, Default)]
pub struct Handover {
    state: Mutex<State>,
    next_member: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    holder: Option<u64>,
    waiting: Vec<Waiting>,
    /// When the last holder let go, for the log: the gap between the source's rings stopping
    /// and the destination's first request is part of a migration's downtime.
    released_at: Option<Instant>,
}

/// A queue of another export than the holder that has requests for the device.
struct Waiting {
    member: u64,
    queue: usize,
    wake: Waker,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("member", &self.member)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
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
            wait_began: Mutex::new(None),
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
    /// The connection is ending: its queues neither take the device nor wait for it.
    closing: AtomicBool,
    /// When a queue of this export first found the device held, for the log.
    wait_began: Mutex<Option<Instant>>,
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
    /// Before queue `queue` takes requests: whether it may. Takes the device if it is free.
    /// While another export holds it, says no at once and keeps the waker `wake` makes, which
    /// the release calls. `started` tells whether the frontend still has the ring started (it
    /// is asked under the lock `leave` takes, after the frontend marked the ring stopped, so
    /// a stopped ring neither takes the device nor leaves a waker behind).
    pub fn enter(
        &self,
        queue: usize,
        started: &dyn Fn() -> bool,
        wake: &dyn Fn() -> Waker,
    ) -> bool {
        let bit = bit(queue);
        if self.running.load(Ordering::Relaxed) & bit != 0 {
            return true;
        }
        let mut state = self.handover.state.lock();
        if self.closing.load(Ordering::Acquire) || !started() {
            return false;
        }
        match state.holder {
            Some(id) if id != self.id => {
                if !state
                    .waiting
                    .iter()
                    .any(|w| w.member == self.id && w.queue == queue)
                {
                    // In QEMU's flow the source stops its rings before the destination starts
                    // its own: a wait means two frontends run the disk at once.
                    warn!(
                        "{}: queue {queue} waits for another export of its device to stop its                          rings (a migration source that did not stop?)",
                        self.name
                    );
                    self.wait_began.lock().get_or_insert_with(Instant::now);
                    state.waiting.push(Waiting {
                        member: self.id,
                        queue,
                        wake: wake(),
                    });
                }
                false
            }
            _ => {
                if state.holder.is_none() {
                    let waited = self
                        .wait_began
                        .lock()
                        .take()
                        .map(|at| at.elapsed().as_secs_f64() * 1e3);
                    match state.released_at.take() {
                        Some(at) => info!(
                            "{}: now the running export of its device, {:.3} ms after the \
                             last one stopped its rings (queue {queue} waited {:.3} ms)",
                            self.name,
                            at.elapsed().as_secs_f64() * 1e3,
                            waited.unwrap_or(0.0)
                        ),
                        None => info!("{}: now the running export of its device", self.name),
                    }
                }
                state
                    .waiting
                    .retain(|w| !(w.member == self.id && w.queue == queue));
                state.holder = Some(self.id);
                self.running.fetch_or(bit, Ordering::AcqRel);
                true
            }
        }
    }

    /// Queue `queue` stopped (its requests are finished); the last to stop releases the
    /// device and wakes the queues waiting for it.
    pub fn leave(&self, queue: usize) {
        let mut state = self.handover.state.lock();
        state
            .waiting
            .retain(|w| !(w.member == self.id && w.queue == queue));
        let before = self.running.fetch_and(!bit(queue), Ordering::AcqRel);
        if before != 0 && before & !bit(queue) == 0 && state.holder == Some(self.id) {
            state.holder = None;
            state.released_at = Some(Instant::now());
            info!(
                "{}: rings stopped; the device is free for another export",
                self.name
            );
            let waiting = std::mem::take(&mut state.waiting);
            drop(state);
            // A woken queue comes back through its worker and asks again (`enter`); it
            // leaves a new waker if a third export took the device first.
            for w in waiting {
                (w.wake)();
            }
        }
    }

    /// The connection ends: its queues no longer take the device or wait for it (until
    /// [`Member::reopen`]).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let mut state = self.handover.state.lock();
        state.waiting.retain(|w| w.member != self.id);
        *self.wait_began.lock() = None;
    }

    /// A new connection may wait again.
    pub fn reopen(&self) {
        self.closing.store(false, Ordering::Release);
    }

    /// Whether this export holds its device (has started rings).
    pub fn active(&self) -> bool {
        self.handover.state.lock().holder == Some(self.id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A waker that counts its calls in `woken`.
    fn counter(woken: &Arc<AtomicUsize>) -> impl Fn() -> Waker + '_ {
        move || {
            let woken = woken.clone();
            Box::new(move || {
                woken.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    fn never() -> Waker {
        Box::new(|| panic!("woken"))
    }

    #[test]
    fn a_second_export_runs_only_after_the_first_stopped_all_its_rings() {
        let device = Handover::new();
        let source = device.member("source");
        let dest = device.member("destination");
        let yes = || true;
        assert!(source.enter(0, &yes, &never) && source.enter(1, &yes, &never));
        assert!(source.active() && !dest.active());

        // Told no at once, without blocking the worker; asked again, it waits once.
        let woken = Arc::new(AtomicUsize::new(0));
        assert!(!dest.enter(0, &yes, &counter(&woken)));
        assert!(!dest.enter(0, &yes, &counter(&woken)));
        source.leave(0);
        assert_eq!(
            woken.load(Ordering::SeqCst),
            0,
            "one source ring still runs"
        );
        assert!(!dest.enter(0, &yes, &counter(&woken)));
        source.leave(1);
        assert_eq!(woken.load(Ordering::SeqCst), 1, "woken once at the release");
        assert!(dest.enter(0, &yes, &never));
        assert!(dest.active() && !source.active());

        // Back again (A -> B -> A): the source waits for the destination in turn.
        let back = Arc::new(AtomicUsize::new(0));
        assert!(!source.enter(0, &yes, &counter(&back)));
        dest.leave(0);
        assert_eq!(back.load(Ordering::SeqCst), 1);
        assert!(source.enter(0, &yes, &never) && source.active());
    }

    #[test]
    fn a_stopped_ring_or_a_closing_connection_takes_its_waker_back() {
        let device = Handover::new();
        let source = device.member("source");
        let dest = device.member("destination");
        assert!(source.enter(0, &|| true, &never));
        assert!(
            !dest.enter(0, &|| false, &never),
            "a stopped ring takes nothing and waits for nothing"
        );
        // A ring that stops while waiting, and a connection that ends: neither is woken.
        assert!(!dest.enter(0, &|| true, &never));
        dest.leave(0);
        assert!(!dest.enter(1, &|| true, &never));
        dest.close();
        assert!(
            !dest.enter(2, &|| true, &never),
            "a closing connection waits for nothing"
        );
        source.leave(0);
        assert!(!source.active());
        dest.reopen();
        assert!(dest.enter(0, &|| true, &never));
    }

    #[test]
    fn leaving_a_queue_that_never_ran_releases_nothing() {
        let device = Handover::new();
        let a = device.member("a");
        let b = device.member("b");
        assert!(a.enter(0, &|| true, &never));
        b.leave(0);
        a.leave(1);
        assert!(a.active());
    }
}
