//! SET_VRING_ADDR repeated for a ring that runs.
//!
//! QEMU sends SET_VRING_ADDR again to rings that are running when dirty logging starts and
//! ends (to set or clear `VHOST_VRING_F_LOG`). vhost-user-backend answers every SET_VRING_ADDR
//! by reading the used index back from guest memory and making it the ring's next used
//! index, in two steps separate from the worker that publishes completions: a completion
//! published between them would be overwritten by the next one, and the guest would wait for
//! it forever. The addresses are the same and the log flag changes nothing here (pages are
//! logged through the guest memory bitmap, the used ring's included), so such a repeat is
//! acknowledged without being passed on.

/// What the frontend last set for each ring.
#[derive(Default)]
pub struct RingAddrs {
    rings: Vec<Ring>,
}

#[derive(Clone, Copy, Default)]
struct Ring {
    /// Descriptor table, used ring, available ring (frontend addresses), as last accepted.
    addrs: Option<(u64, u64, u64)>,
    /// Between SET_VRING_KICK and GET_VRING_BASE.
    running: bool,
}

impl RingAddrs {
    fn ring(&mut self, index: usize) -> Option<&mut Ring> {
        self.rings.get_mut(index)
    }

    /// Whether SET_VRING_ADDR with `addrs` for ring `index` repeats what a running ring has.
    pub fn is_repeat(&self, index: u32, addrs: (u64, u64, u64)) -> bool {
        self.rings
            .get(index as usize)
            .is_some_and(|r| r.running && r.addrs == Some(addrs))
    }

    /// The device accepted `addrs` for ring `index` (so `index` is one of its rings).
    pub fn set(&mut self, index: u32, addrs: (u64, u64, u64)) {
        let i = index as usize;
        if self.rings.len() <= i {
            self.rings.resize(i + 1, Ring::default());
        }
        if let Some(r) = self.ring(i) {
            r.addrs = Some(addrs);
        }
    }

    /// Ring `index` got its kick fd: it runs.
    pub fn started(&mut self, index: u32) {
        if let Some(r) = self.ring(index as usize) {
            r.running = true;
        }
    }

    /// Ring `index` was stopped (GET_VRING_BASE).
    pub fn stopped(&mut self, index: u32) {
        if let Some(r) = self.ring(index as usize) {
            r.running = false;
        }
    }

    /// The memory table changed: the same frontend addresses may now mean other guest
    /// addresses, so the next SET_VRING_ADDR is passed on whatever it says.
    pub fn memory_changed(&mut self) {
        for r in &mut self.rings {
            r.addrs = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RingAddrs;

    const A: (u64, u64, u64) = (0x1000, 0x3000, 0x2000);

    #[test]
    fn only_an_identical_address_set_for_a_running_ring_is_a_repeat() {
        let mut r = RingAddrs::default();
        assert!(!r.is_repeat(0, A), "nothing set yet");
        r.set(0, A);
        assert!(!r.is_repeat(0, A), "not running: the ring is being set up");
        r.started(0);
        assert!(r.is_repeat(0, A));
        assert!(!r.is_repeat(0, (0x1000, 0x3000, 0x2800)), "other addresses");
        assert!(!r.is_repeat(1, A), "another ring");
        r.stopped(0);
        assert!(!r.is_repeat(0, A), "stopped: a new start may reset indices");
        r.started(0);
        r.memory_changed();
        assert!(!r.is_repeat(0, A), "addresses may mean other memory now");
    }

    #[test]
    fn a_ring_index_never_set_is_ignored() {
        let mut r = RingAddrs::default();
        r.started(7);
        r.stopped(7);
        assert!(!r.is_repeat(7, A));
    }
}
