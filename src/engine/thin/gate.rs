//! Gates between thin data I/O and the operations that must not overlap it.
//!
//! A pool has two (see pool.rs for who takes which):
//! - the I/O gate: every data I/O of a thin device holds a ticket from its mapping lookup
//!   until the host I/O completes, possibly on another thread after an asynchronous
//!   submission. A quiesce (a snapshot) closes it and waits for every ticket out. A commit
//!   only waits for a grace period: the tickets taken before it began, each in one of two
//!   epochs, so that no I/O that may have looked up a block freed before then is still in
//!   flight when the commit makes the block reusable. New I/O never waits for that.
//! - the provision gate: held from a block's allocation to its mapping's insertion, and
//!   while blocks are unmapped. A commit closes it for its whole duration, so it commits no
//!   allocation without its mapping and no mapping whose data it did not flush, and no block
//!   is freed between its grace period and the metadata write.
//!
//! A thread that holds tickets must never wait for a gate it holds (it would wait for
//! itself): the asynchronous path only ever tries to enter, and the synchronous path enters
//! the provision gate before the I/O gate.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::engine::{BlockError, Hold};

#[derive(Default)]
struct State {
    /// Tickets out, by the epoch they were taken in.
    in_flight: [u64; 2],
    epoch: usize,
    closed: bool,
}

impl State {
    fn total(&self) -> u64 {
        self.in_flight[0] + self.in_flight[1]
    }
}

#[derive(Default)]
pub struct IoGate {
    state: Mutex<State>,
    changed: Condvar,
    /// Serializes grace periods: the epoch being waited out must not be reused meanwhile.
    grace: Mutex<()>,
}

/// Held while one data I/O is in flight (or one provisioning, in the provision gate).
pub struct Ticket {
    gate: Arc<IoGate>,
    epoch: usize,
}

/// Holds the gate closed (and drained) until dropped.
pub struct Closed<'a> {
    gate: &'a IoGate,
}

impl IoGate {
    fn ticket(self: &Arc<Self>, s: &mut State) -> Ticket {
        s.in_flight[s.epoch] += 1;
        Ticket {
            gate: self.clone(),
            epoch: s.epoch,
        }
    }

    /// A ticket, waiting while the gate is closed.
    pub fn enter(self: &Arc<Self>) -> Ticket {
        let mut s = self.state.lock();
        while s.closed {
            self.changed.wait(&mut s);
        }
        self.ticket(&mut s)
    }

    /// A ticket, or `None` at once if the gate is closed.
    pub fn try_enter(self: &Arc<Self>) -> Option<Ticket> {
        let mut s = self.state.lock();
        if s.closed {
            return None;
        }
        Some(self.ticket(&mut s))
    }

    /// Closes the gate and waits until no ticket is out.
    pub fn close(&self) -> Closed<'_> {
        let mut s = self.state.lock();
        // Another closer goes first; the gate is reopened before this one takes it.
        while s.closed {
            self.changed.wait(&mut s);
        }
        s.closed = true;
        while s.total() > 0 {
            self.changed.wait(&mut s);
        }
        Closed { gate: self }
    }

    /// Waits until every ticket taken before this call is back; tickets taken meanwhile
    /// neither wait nor are waited for.
    pub fn grace(&self) {
        let _one_at_a_time = self.grace.lock();
        let mut s = self.state.lock();
        let old = s.epoch;
        s.epoch = 1 - old;
        while s.in_flight[old] > 0 {
            self.changed.wait(&mut s);
        }
    }
}

impl Hold for Ticket {
    fn finish(self: Box<Self>, _ok: bool) -> Result<(), BlockError> {
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock();
        s.in_flight[self.epoch] -= 1;
        if s.in_flight[self.epoch] == 0 {
            self.gate.changed.notify_all();
        }
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.gate.state.lock().closed = false;
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn closing_waits_for_tickets_and_blocks_new_ones() {
        let gate = Arc::new(IoGate::default());
        let t = gate.enter();
        let g = gate.clone();
        let closer = std::thread::spawn(move || {
            let _closed = g.close();
            assert!(g.try_enter().is_none(), "entered a closed gate");
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!closer.is_finished(), "closed with a ticket out");
        drop(t);
        closer.join().unwrap();
        assert!(gate.try_enter().is_some(), "the gate stayed closed");
    }

    #[test]
    fn a_grace_period_waits_for_older_tickets_only() {
        let gate = Arc::new(IoGate::default());
        let old = gate.enter();
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.grace());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the grace period ended with an older ticket out"
        );
        // New tickets go in at once, and are not waited for.
        let newer = gate.try_enter().expect("a grace period closes nothing");
        drop(old);
        waiter.join().unwrap();
        // The next grace period waits for the ticket that was new during the last one.
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.grace());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(newer);
        waiter.join().unwrap();
    }
}
