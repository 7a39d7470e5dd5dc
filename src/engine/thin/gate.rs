//! The gate between thin data I/O and commits.
//!
//! Every thin data I/O holds a ticket from its mapping lookup until the host I/O completes —
//! possibly on another thread, after an asynchronous submission. A commit closes the gate and
//! waits for the tickets out: then no mapping it commits points at data still being written,
//! and no block it frees is still being read when it becomes reusable.
//!
//! A thread that holds tickets must never wait for the gate (it would wait for itself): the
//! asynchronous path only ever tries to enter, and the synchronous path is entered only by
//! threads with nothing in flight.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::engine::{BlockError, Hold};

#[derive(Default)]
struct State {
    in_flight: u64,
    closed: bool,
}

#[derive(Default)]
pub struct IoGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// Held while one data I/O is in flight.
pub struct Ticket {
    gate: Arc<IoGate>,
}

/// Holds the gate closed (and drained) until dropped.
pub struct Closed<'a> {
    gate: &'a IoGate,
}

impl IoGate {
    /// A ticket, waiting while the gate is closed.
    pub fn enter(self: &Arc<Self>) -> Ticket {
        let mut s = self.state.lock();
        while s.closed {
            self.changed.wait(&mut s);
        }
        s.in_flight += 1;
        Ticket { gate: self.clone() }
    }

    /// A ticket, or `None` at once if the gate is closed.
    pub fn try_enter(self: &Arc<Self>) -> Option<Ticket> {
        let mut s = self.state.lock();
        if s.closed {
            return None;
        }
        s.in_flight += 1;
        Some(Ticket { gate: self.clone() })
    }

    /// Closes the gate and waits until no ticket is out.
    pub fn close(&self) -> Closed<'_> {
        let mut s = self.state.lock();
        // Another closer goes first; the gate is reopened before this one takes it.
        while s.closed {
            self.changed.wait(&mut s);
        }
        s.closed = true;
        while s.in_flight > 0 {
            self.changed.wait(&mut s);
        }
        Closed { gate: self }
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
        s.in_flight -= 1;
        if s.in_flight == 0 {
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
}
