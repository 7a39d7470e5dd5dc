//! The persistent store in dm-snapshot's on-disk format (see `format.rs`).
//!
//! Commit order, so a power cut at any point leaves a store that reopens consistent:
//! 1. data chunks are written (by the device), and the next metadata area is zeroed if this
//!    commit fills the current one; then one flush;
//! 2. the metadata areas holding the new pairs are rewritten whole; then one flush.
//!
//! A pair therefore never reaches the disk before the data it points to, and reading never
//! runs from a full area into a stale one. On open, whatever follows the end marker of the
//! last area is cleared (and flushed) before anything is appended, so pairs of a torn,
//! uncommitted write cannot come back to life behind a later append.

use crate::engine::{Bufs, BufsMut};
use std::sync::Arc;

use super::format::{check_chunk_size, decode_entry, encode_entry, Header, Layout, ENTRY};
use super::runs::ExceptionTable;
use super::store::{ExceptionStore, Opened, Usage};
use super::CowError;
use crate::engine::BlockDevice;

pub struct PersistentStore {
    dev: Arc<dyn BlockDevice>,
    layout: Layout,
    /// Chunks on the device.
    total: u64,
    next_free: u64,
    /// The area pairs are appended to, its contents, and how many pairs it holds.
    current_area: u64,
    area: Vec<u8>,
    committed: u64,
    valid: bool,
}

fn chunk_buf(chunk_size: u64) -> Vec<u8> {
    vec![0u8; chunk_size as usize]
}

impl PersistentStore {
    /// The store on `dev` with nothing read or allocated yet: the next chunk to hand out is
    /// the first data chunk.
    fn empty(dev: Arc<dyn BlockDevice>, chunk_size: u64, valid: bool) -> PersistentStore {
        let layout = Layout::new(chunk_size);
        PersistentStore {
            total: dev.size() / chunk_size,
            dev,
            layout,
            next_free: layout.first_data_chunk(),
            current_area: 0,
            area: chunk_buf(chunk_size),
            committed: 0,
            valid,
        }
    }

    /// Formats `dev` as an empty, valid store.
    pub fn create(
        dev: Arc<dyn BlockDevice>,
        chunk_size: u64,
    ) -> Result<Opened<PersistentStore>, CowError> {
        let chunk_size = check_chunk_size(chunk_size)?;
        let store = Self::empty(dev, chunk_size, true);
        if store.total < store.layout.first_data_chunk() + 1 {
            return Err(CowError::TooSmall {
                size: store.dev.size(),
                chunk: chunk_size,
            });
        }
        // Area 0 first, then the header that makes the store exist.
        store.write_area()?;
        store.dev.flush()?;
        store.write_header()?;
        store.dev.flush()?;
        Ok(Opened {
            store,
            table: ExceptionTable::default(),
        })
    }

    /// Opens a formatted store. `chunk_size`, when given, must match the header.
    pub fn open(
        dev: Arc<dyn BlockDevice>,
        chunk_size: Option<u64>,
    ) -> Result<Opened<PersistentStore>, CowError> {
        match read_header(dev.as_ref())? {
            Some(h) => Self::load(dev, h, chunk_size),
            None => Err(CowError::NotAStore(0)),
        }
    }

    /// Opens the store on `dev`, formatting it first if chunk 0 is all zeros (a new file).
    pub fn open_or_create(
        dev: Arc<dyn BlockDevice>,
        chunk_size: Option<u64>,
        default_chunk: u64,
    ) -> Result<Opened<PersistentStore>, CowError> {
        match read_header(dev.as_ref())? {
            Some(h) => Self::load(dev, h, chunk_size),
            None => Self::create(dev, chunk_size.unwrap_or(default_chunk)),
        }
    }

    fn load(
        dev: Arc<dyn BlockDevice>,
        header: Header,
        asked: Option<u64>,
    ) -> Result<Opened<PersistentStore>, CowError> {
        let chunk_size = header.chunk_size;
        if let Some(asked) = asked.filter(|&a| a != chunk_size) {
            return Err(CowError::ChunkSizeMismatch {
                found: chunk_size,
                asked,
            });
        }
        let mut store = Self::empty(dev, chunk_size, header.valid);
        let (layout, total) = (store.layout, store.total);
        let mut table = ExceptionTable::default();
        if !header.valid {
            // The kernel never reads the exceptions of an invalid snapshot either.
            return Ok(Opened { store, table });
        }
        let mut used = vec![0u64; total.div_ceil(64) as usize];
        let mut max_new = 0;
        loop {
            let loc = layout.area_location(store.current_area);
            if loc >= total {
                break;
            }
            store.read_area(store.current_area)?;
            let n = store.insert_area(&mut table, &mut used, &mut max_new)?;
            store.committed = n;
            if n < layout.per_area {
                break;
            }
            store.current_area += 1;
            store.committed = 0;
            store.area.fill(0);
        }
        store.next_free = layout.skip_metadata((max_new + 1).max(layout.first_data_chunk()));
        store.clear_after_end()?;
        Ok(Opened { store, table })
    }

    /// Adds the pairs of the area in memory; returns how many it holds.
    fn insert_area(
        &self,
        table: &mut ExceptionTable,
        used: &mut [u64],
        max_new: &mut u64,
    ) -> Result<u64, CowError> {
        let area = self.current_area;
        for index in 0..self.layout.per_area {
            let corrupt = |why| CowError::Corrupt { area, index, why };
            let (old, new) = decode_entry(&self.area, index).ok_or(corrupt("short area"))?;
            if new == 0 {
                return Ok(index);
            }
            if old.checked_mul(self.layout.chunk_size).is_none() {
                return Err(corrupt("old chunk lies beyond any device"));
            }
            if new >= self.total || !self.layout.is_data_chunk(new) {
                return Err(corrupt("new chunk is not a data chunk of the store"));
            }
            let (word, bit) = ((new / 64) as usize, new % 64);
            let slot = used
                .get_mut(word)
                .ok_or(corrupt("new chunk out of range"))?;
            if *slot & (1 << bit) != 0 {
                return Err(corrupt("two exceptions share a data chunk"));
            }
            *slot |= 1 << bit;
            if !table.insert(old, new) {
                return Err(corrupt("old chunk has two exceptions"));
            }
            *max_new = (*max_new).max(new);
        }
        Ok(self.layout.per_area)
    }

    /// Rewrites the current area if anything but zeros follows its last pair on disk.
    fn clear_after_end(&mut self) -> Result<(), CowError> {
        let at = (self.committed * ENTRY) as usize;
        let dirty = self
            .area
            .get(at..)
            .is_some_and(|t| t.iter().any(|&b| b != 0));
        if dirty && self.layout.area_location(self.current_area) < self.total {
            if let Some(t) = self.area.get_mut(at..) {
                t.fill(0);
            }
            self.write_area()?;
            self.dev.flush()?;
        }
        Ok(())
    }

    fn offset(&self, chunk: u64) -> u64 {
        chunk * self.layout.chunk_size
    }

    fn read_area(&mut self, area: u64) -> Result<(), CowError> {
        let at = self.offset(self.layout.area_location(area));
        self.dev.read(at, &mut BufsMut::one(&mut self.area))?;
        Ok(())
    }

    fn write_area(&self) -> Result<(), CowError> {
        let at = self.offset(self.layout.area_location(self.current_area));
        self.dev.write(at, &Bufs::one(&self.area))?;
        Ok(())
    }

    fn zero_area(&self, area: u64) -> Result<(), CowError> {
        let loc = self.layout.area_location(area);
        if loc < self.total {
            let zeros = chunk_buf(self.layout.chunk_size);
            self.dev.write(self.offset(loc), &Bufs::one(&zeros))?;
        }
        Ok(())
    }

    fn write_header(&self) -> Result<(), CowError> {
        let mut sector = [0u8; 512];
        let h = Header {
            valid: self.valid,
            chunk_size: self.layout.chunk_size,
        };
        sector[..Header::LEN].copy_from_slice(&h.encode());
        self.dev.write(0, &Bufs::one(&sector))?;
        Ok(())
    }
}

fn read_header(dev: &dyn BlockDevice) -> Result<Option<Header>, CowError> {
    let mut sector = [0u8; 512];
    if dev.size() < 512 {
        return Err(CowError::TooSmall {
            size: dev.size(),
            chunk: 0,
        });
    }
    dev.read(0, &mut BufsMut::one(&mut sector))?;
    let mut h = [0u8; Header::LEN];
    h.copy_from_slice(&sector[..Header::LEN]);
    Header::decode(&h)
}

impl ExceptionStore for PersistentStore {
    fn chunk_size(&self) -> u64 {
        self.layout.chunk_size
    }

    fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    fn persistent(&self) -> bool {
        true
    }

    fn valid(&self) -> bool {
        self.valid
    }

    fn prepare(&mut self) -> Result<u64, CowError> {
        if !self.valid {
            return Err(CowError::Invalid);
        }
        if self.next_free >= self.total {
            return Err(CowError::Full);
        }
        let chunk = self.next_free;
        self.next_free = self.layout.skip_metadata(chunk + 1);
        Ok(chunk)
    }

    fn commit(&mut self, exceptions: &[(u64, u64)]) -> Result<(), CowError> {
        if !self.valid {
            return Err(CowError::Invalid);
        }
        let per = self.layout.per_area;
        if self.committed == per {
            // `newest` stepped back into a full area; appends go to the next one, which the
            // step back left with an end marker at its start.
            self.current_area += 1;
            self.committed = 0;
            self.area.fill(0);
        }
        let filled = (self.committed + exceptions.len() as u64) / per;
        for a in 1..=filled {
            self.zero_area(self.current_area + a)?;
        }
        self.dev.flush()?;
        if exceptions.is_empty() {
            return Ok(());
        }
        for &(old, new) in exceptions {
            if self.layout.area_location(self.current_area) >= self.total {
                return Err(CowError::Full);
            }
            encode_entry(&mut self.area, self.committed, old, new);
            self.committed += 1;
            if self.committed == per {
                self.write_area()?;
                self.current_area += 1;
                self.committed = 0;
                self.area.fill(0);
            }
        }
        if self.committed > 0 {
            self.write_area()?;
        }
        self.dev.flush()?;
        Ok(())
    }

    fn invalidate(&mut self) -> Result<(), CowError> {
        self.valid = false;
        self.write_header()?;
        self.dev.flush()?;
        Ok(())
    }

    fn usage(&self) -> Usage {
        Usage {
            used: self.next_free.min(self.total),
            total: self.total,
        }
    }

    fn newest(&mut self, max: usize) -> Result<Vec<(u64, u64)>, CowError> {
        if self.committed == 0 && self.current_area > 0 {
            // The previous area is full on disk; this one is empty.
            self.current_area -= 1;
            self.read_area(self.current_area)?;
            self.committed = self.layout.per_area;
        }
        let mut out = Vec::new();
        let mut i = self.committed;
        while i > 0 && out.len() < max {
            i -= 1;
            let area = self.current_area;
            let e = decode_entry(&self.area, i).ok_or(CowError::Corrupt {
                area,
                index: i,
                why: "short area",
            })?;
            out.push(e);
        }
        Ok(out)
    }

    fn forget_newest(&mut self, n: usize) -> Result<(), CowError> {
        let n = (n as u64).min(self.committed);
        for i in self.committed - n..self.committed {
            encode_entry(&mut self.area, i, 0, 0);
        }
        self.committed -= n;
        self.write_area()?;
        self.dev.flush()?;
        if self.committed == 0 && self.current_area == 0 {
            self.next_free = self.layout.first_data_chunk();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memory::MemoryDevice;

    fn mem(chunks: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemoryDevice::new(chunks * 4096).expect("memory device"))
    }

    #[test]
    fn committed_pairs_survive_a_reopen_across_areas() {
        let dev = mem(1200);
        let mut s = PersistentStore::create(dev.clone(), 4096).unwrap().store;
        let mut pairs = Vec::new();
        for old in 0..600u64 {
            let new = s.prepare().unwrap();
            pairs.push((old * 3, new));
        }
        s.commit(&pairs[..300]).unwrap();
        s.commit(&pairs[300..]).unwrap();
        let o = PersistentStore::open(dev, Some(4096)).unwrap();
        assert_eq!(o.table.len(), 600);
        for &(old, new) in &pairs {
            assert_eq!(o.table.lookup(old), Some(new));
        }
        assert_eq!(o.store.usage().used, s.usage().used);
        // No data chunk sits on an area: 600 pairs span areas 0, 1 and 2.
        assert!(pairs.iter().all(|&(_, n)| n != 1 && n != 258 && n != 515));
    }

    #[test]
    fn a_store_of_another_chunk_size_is_refused() {
        let dev = mem(64);
        PersistentStore::create(dev.clone(), 8192).unwrap();
        assert!(matches!(
            PersistentStore::open(dev, Some(4096)),
            Err(CowError::ChunkSizeMismatch { .. })
        ));
    }

    #[test]
    fn an_invalidated_store_reopens_invalid() {
        let dev = mem(64);
        let mut s = PersistentStore::create(dev.clone(), 4096).unwrap().store;
        s.invalidate().unwrap();
        let o = PersistentStore::open(dev, None).unwrap();
        assert!(!o.store.valid());
        assert!(o.table.is_empty());
    }

    #[test]
    fn a_pair_pointing_at_metadata_is_corruption() {
        let dev = mem(64);
        let _ = PersistentStore::create(dev.clone(), 4096).unwrap();
        let mut area = vec![0u8; 4096];
        encode_entry(&mut area, 0, 5, 1);
        dev.write(4096, &Bufs::one(&area)).unwrap();
        assert!(matches!(
            PersistentStore::open(dev, None),
            Err(CowError::Corrupt { index: 0, .. })
        ));
    }

    #[test]
    fn pairs_left_behind_the_end_by_a_torn_write_never_come_back() {
        let dev = mem(1200);
        let mut s = PersistentStore::create(dev.clone(), 4096).unwrap().store;
        let pairs: Vec<_> = (0..3u64).map(|o| (o, s.prepare().unwrap())).collect();
        s.commit(&pairs).unwrap();
        // A torn commit whose later sector reached the disk, its earlier one not.
        let mut area = vec![0u8; 4096];
        dev.read(4096, &mut BufsMut::one(&mut area)).unwrap();
        encode_entry(&mut area, 40, 999, 100);
        dev.write(4096, &Bufs::one(&area)).unwrap();
        let mut s = PersistentStore::open(dev.clone(), None).unwrap().store;
        let more: Vec<_> = (3..40u64).map(|o| (o, s.prepare().unwrap())).collect();
        s.commit(&more).unwrap();
        let o = PersistentStore::open(dev, None).unwrap();
        assert_eq!(o.table.len(), 40);
        assert_eq!(o.table.lookup(999), None);
    }

    #[test]
    fn a_pair_for_an_impossible_old_chunk_is_corruption() {
        let dev = mem(64);
        let _ = PersistentStore::create(dev.clone(), 4096).unwrap();
        let mut area = vec![0u8; 4096];
        encode_entry(&mut area, 0, u64::MAX, 2);
        dev.write(4096, &Bufs::one(&area)).unwrap();
        assert!(matches!(
            PersistentStore::open(dev, None),
            Err(CowError::Corrupt { index: 0, .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn opening_a_damaged_store_never_panics(
            pairs in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u64..600), 0..300),
            garbage_at in 0usize..8192,
        ) {
            let dev = mem(600);
            let _ = PersistentStore::create(dev.clone(), 4096).unwrap();
            let mut areas = vec![0u8; 2 * 4096];
            for (i, &(old, new)) in pairs.iter().enumerate() {
                let (a, idx) = (i / 256, (i % 256) as u64);
                encode_entry(&mut areas[a * 4096..(a + 1) * 4096], idx, old % 1000, new);
            }
            areas[garbage_at] ^= 0x5a;
            dev.write(4096, &Bufs::one(&areas[..4096])).unwrap();
            dev.write(258 * 4096, &Bufs::one(&areas[4096..])).unwrap();
            if let Ok(o) = PersistentStore::open(dev, None) {
                let mut s = o.store;
                let _ = s.newest(1000);
                let _ = s.prepare();
            }
        }
    }

    #[test]
    fn forgetting_the_newest_pairs_is_durable() {
        let dev = mem(1200);
        let mut s = PersistentStore::create(dev.clone(), 4096).unwrap().store;
        let pairs: Vec<_> = (0..300u64).map(|o| (o, s.prepare().unwrap())).collect();
        s.commit(&pairs).unwrap();
        let newest = s.newest(50).unwrap();
        assert_eq!(newest.len(), 44); // what area 1 holds
        assert_eq!(newest.first(), pairs.last());
        s.forget_newest(44).unwrap();
        assert_eq!(s.newest(10).unwrap().first(), pairs.get(255));
        s.forget_newest(10).unwrap();
        let o = PersistentStore::open(dev, None).unwrap();
        assert_eq!(o.table.len(), 246);
    }
}
