//! Keeps the SIGBUS table ([`super::sigbus`]) in step with one connection's guest memory
//! mappings.
//!
//! A memory table message maps new regions; the old table stays mapped as long as anything
//! still holds it (a request in flight keeps the `GuestMemoryMmap` it was started with). So a
//! range is registered from the moment its region is mapped until no table that contains it
//! is alive any more, which is seen through a weak reference to every table installed. Ranges
//! whose tables are gone are unregistered at the next memory message; whatever is left is
//! released by the connection when it ends, after its workers are joined and its requests
//! finished (see `connection.rs`): until then an unmapped range's entry is stale, which is
//! harmless (see `Table::lookup`).
//!
//! Slots for the new regions are reserved before they are mapped, so that a full table refuses
//! the message instead of leaving memory mapped that a SIGBUS could not be traced to.

use std::io;
use std::sync::{Arc, Weak};

use log::warn;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty_log::GuestMemoryMmap;

use super::sigbus::{self, Reserved, TableFull, SLOTS};

/// One connection's registrations.
pub struct GuestMemoryGuard {
    owner: u64,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Every table installed that may still be alive.
    tables: Vec<Weak<GuestMemoryMmap>>,
    /// Registered ranges: (start, len, slot).
    registered: Vec<(usize, usize, usize)>,
}

/// Slots taken for regions about to be mapped.
pub type Reservation = Vec<Reserved<'static, SLOTS>>;

impl GuestMemoryGuard {
    /// Watches the tables installed in `memory` (the one given to the vhost-user handler),
    /// for the connection `owner` ([`sigbus::new_owner`]). Installs the SIGBUS handler.
    pub fn new(memory: GuestMemoryAtomic<GuestMemoryMmap>, owner: u64) -> io::Result<Self> {
        sigbus::install()?;
        Ok(GuestMemoryGuard {
            owner,
            memory,
            tables: Vec::new(),
            registered: Vec::new(),
        })
    }

    /// Takes `regions` slots for regions about to be mapped; refused if the table is full.
    pub fn reserve(&self, regions: usize) -> Result<Reservation, TableFull> {
        (0..regions)
            .map(|_| sigbus::table().reserve(self.owner))
            .collect()
    }

    /// After a memory table message: registers the mapped ranges of the table now installed
    /// (in the slots of `reserved` first) and unregisters those of tables no longer alive.
    pub fn installed(&mut self, reserved: Reservation) {
        let current = self.memory.memory().into_inner();
        if !self
            .tables
            .iter()
            .any(|t| t.ptr_eq(&Arc::downgrade(&current)))
        {
            self.tables.push(Arc::downgrade(&current));
        }
        drop(current);
        let mut live: Vec<(usize, usize)> = Vec::new();
        self.tables.retain(|t| match t.upgrade() {
            Some(table) => {
                for region in table.iter() {
                    let range = (region.as_ptr() as usize, region.len() as usize);
                    if !live.contains(&range) {
                        live.push(range);
                    }
                }
                true
            }
            None => false,
        });
        let owner = self.owner;
        self.registered.retain(|&(start, len, slot)| {
            let keep = live.contains(&(start, len));
            if !keep {
                sigbus::table().unregister(owner, slot);
            }
            keep
        });
        let mut reserved = reserved.into_iter();
        for (start, len) in live {
            if self
                .registered
                .iter()
                .any(|&(s, l, _)| (s, l) == (start, len))
            {
                continue;
            }
            let slot = match reserved.next() {
                Some(r) => Ok(r.set(start, len)),
                None => sigbus::table().register(owner, start, len),
            };
            match slot {
                Ok(slot) => self.registered.push((start, len, slot)),
                // Reserved before mapping, so this is not reached; if it were, a truncation
                // of this range would end the daemon as it did before this module.
                Err(e) => warn!("guest memory at {start:#x} is not guarded: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::*;

    fn table_of(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges.iter().map(|&(g, l)| (GuestAddress(g), l)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn host(mem: &GuestMemoryMmap, guest: u64) -> usize {
        mem.get_host_address(GuestAddress(guest)).unwrap() as usize
    }

    #[test]
    fn ranges_stay_registered_while_a_table_holding_them_lives() {
        let atomic = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let owner = sigbus::new_owner();
        let mut guard = GuestMemoryGuard::new(atomic.clone(), owner).unwrap();
        atomic
            .lock()
            .unwrap()
            .replace(table_of(&[(0, 0x10000), (0x10_0000, 0x2000)]));
        guard.installed(guard.reserve(2).unwrap());
        let first = atomic.memory().into_inner();
        let (a, b) = (host(&first, 0), host(&first, 0x10_0000));
        assert!(sigbus::table().holds(owner, a) && sigbus::table().holds(owner, b + 0x1fff));

        // A new table while a request in flight still holds the first one: both stay.
        atomic.lock().unwrap().replace(table_of(&[(0, 0x4000)]));
        guard.installed(guard.reserve(1).unwrap());
        let c = host(&atomic.memory(), 0);
        assert!(sigbus::table().holds(owner, a) && sigbus::table().holds(owner, c));

        // The request finishes: the next memory message lets go of the first table's ranges.
        drop(first);
        atomic.lock().unwrap().replace(table_of(&[(0, 0x4000)]));
        guard.installed(guard.reserve(1).unwrap());
        let d = host(&atomic.memory(), 0);
        assert!(sigbus::table().holds(owner, d));
        let registered: Vec<_> = guard.registered.iter().map(|&(s, _, _)| s).collect();
        assert_eq!(registered, vec![d], "only the live table's range is left");
        sigbus::table().release_owner(owner);
        assert!(!sigbus::table().holds(owner, d));
    }
}
