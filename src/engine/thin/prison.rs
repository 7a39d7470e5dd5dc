//! Cells that serialize changes to one virtual block (the kernel's bio prison, reduced to what
//! a synchronous engine needs): two writes that both find a block unmapped or shared must not
//! both provision it.

use std::collections::HashSet;

use parking_lot::{Condvar, Mutex};

/// A device's virtual block.
pub type CellKey = (u64, u64);

#[derive(Default)]
pub struct Prison {
    held: Mutex<HashSet<CellKey>>,
    freed: Condvar,
}

/// Holds a cell until dropped.
pub struct Cell<'a> {
    prison: &'a Prison,
    key: CellKey,
}

impl Prison {
    /// Waits until nobody holds `key`, then holds it.
    pub fn lock(&self, key: CellKey) -> Cell<'_> {
        let mut held = self.held.lock();
        while held.contains(&key) {
            self.freed.wait(&mut held);
        }
        held.insert(key);
        Cell { prison: self, key }
    }

    /// Holds `key` if nobody does; the caller gives it back with [`Prison::give_back`]. For
    /// holders that outlive a borrow (an asynchronous first write).
    pub fn try_take(&self, key: CellKey) -> bool {
        self.held.lock().insert(key)
    }

    /// Releases a cell taken with [`Prison::try_take`].
    pub fn give_back(&self, key: CellKey) {
        self.held.lock().remove(&key);
        self.freed.notify_all();
    }
}

impl Drop for Cell<'_> {
    fn drop(&mut self) {
        self.prison.held.lock().remove(&self.key);
        self.prison.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn one_holder_per_cell_at_a_time() {
        let prison = Arc::new(Prison::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (p, n) = (prison.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _c = p.lock((1, 7));
                        assert_eq!(n.fetch_add(1, Ordering::SeqCst), 0);
                        n.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let _a = prison.lock((1, 1));
        let _b = prison.lock((1, 2));
    }
}
