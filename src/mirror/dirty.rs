//! A dirty map: which granules of a device were written since the mirror last copied them.
//! Writers mark from any queue worker without a lock (one `fetch_or` per word touched); the
//! mirror takes runs of dirty granules, clearing them *before* it reads them, so a write
//! that lands after the read marks them again and they are copied again.

use std::sync::atomic::{AtomicU64, Ordering};

/// The bitmap never needs more than this many granules (16 MiB of bits): huge devices get
/// coarser granules instead.
const MAX_GRANULES: u64 = 1 << 27;

pub struct DirtyMap {
    words: Box<[AtomicU64]>,
    shift: u32,
    size: u64,
    dirty: AtomicU64,
}

impl DirtyMap {
    /// A clean map of a `size`-byte device, with granules of at least `granule` bytes (a
    /// power of two; the thin pool's block size is the natural one).
    pub fn new(size: u64, granule: u64) -> DirtyMap {
        let mut shift = granule.max(512).next_power_of_two().trailing_zeros();
        while size.div_ceil(1u64 << shift) > MAX_GRANULES {
            shift += 1;
        }
        let granules = size.div_ceil(1u64 << shift);
        let words = (0..granules.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyMap {
            words,
            shift,
            size,
            dirty: AtomicU64::new(0),
        }
    }

    pub fn granule(&self) -> u64 {
        1 << self.shift
    }

    /// Granules dirty now.
    pub fn dirty_granules(&self) -> u64 {
        self.dirty.load(Ordering::Acquire)
    }

    /// Bytes dirty now (whole granules).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_granules() << self.shift
    }

    /// Marks every granule `[offset, offset + len)` touches. Ranges past the end are cut.
    pub fn mark(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        let mut g = first;
        while g <= last {
            let (w, bit) = ((g / 64) as usize, g % 64);
            let n = (64 - bit).min(last - g + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let old = self.words[w].fetch_or(mask, Ordering::AcqRel);
            let new_bits = (mask & !old).count_ones();
            if new_bits > 0 {
                self.dirty.fetch_add(u64::from(new_bits), Ordering::AcqRel);
            }
            g += n;
        }
    }

    /// Everything dirty (a full copy starts so, where the allocation says data).
    pub fn mark_all(&self) {
        self.mark(0, self.size);
    }

    /// Takes the first run of dirty granules at or after byte `from` (at most `max` bytes,
    /// at least one granule), clearing it: `(offset, len)` in bytes, cut at the device's end.
    pub fn take(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let max_granules = (max >> self.shift).max(1);
        let total = self.size.div_ceil(1u64 << self.shift);
        let mut g = from >> self.shift;
        // The first dirty granule.
        loop {
            if g >= total {
                return None;
            }
            let (w, bit) = ((g / 64) as usize, g % 64);
            let bits = self.words[w].load(Ordering::Acquire) >> bit;
            if bits == 0 {
                g += 64 - bit;
                continue;
            }
            g += u64::from(bits.trailing_zeros());
            break;
        }
        let start = g;
        let mut taken = 0u64;
        while g < total && taken < max_granules {
            let (w, bit) = ((g / 64) as usize, g % 64);
            let mask = 1u64 << bit;
            let old = self.words[w].fetch_and(!mask, Ordering::AcqRel);
            if old & mask == 0 {
                break;
            }
            self.dirty.fetch_sub(1, Ordering::AcqRel);
            taken += 1;
            g += 1;
        }
        if taken == 0 {
            // Someone took it meanwhile: look again from there.
            return self.take(start << self.shift, max);
        }
        let offset = start << self.shift;
        let end = (g << self.shift).min(self.size);
        Some((offset, end - offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_out_to_granules_and_take_clears_runs() {
        let m = DirtyMap::new(1 << 20, 4096);
        assert_eq!(m.take(0, 1 << 20), None);
        m.mark(4095, 2); // granules 0 and 1
        m.mark(10 * 4096, 1);
        m.mark(10 * 4096 + 100, 1);
        assert_eq!(m.dirty_granules(), 3);
        assert_eq!(m.take(0, 1 << 20), Some((0, 8192)));
        assert_eq!(m.take(0, 1 << 20), Some((40960, 4096)));
        assert_eq!(m.take(0, 1 << 20), None);
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn runs_are_cut_at_max_and_at_the_end_of_the_device() {
        let m = DirtyMap::new(1_000_000, 65536);
        m.mark_all();
        assert_eq!(m.dirty_granules(), 16);
        assert_eq!(m.take(0, 4 * 65536), Some((0, 4 * 65536)));
        assert_eq!(m.take(0, 1 << 40), Some((4 * 65536, 1_000_000 - 4 * 65536)));
        m.mark(999_999, 100);
        m.mark(2_000_000, 100);
        assert_eq!(
            m.take(500_000, 1),
            Some((15 * 65536, 1_000_000 - 15 * 65536))
        );
        assert_eq!(m.dirty_granules(), 0);
    }

    #[test]
    fn words_and_huge_devices() {
        let m = DirtyMap::new(1 << 30, 4096);
        m.mark(63 * 4096, 130 * 4096); // granules 63..193 across words
        assert_eq!(m.dirty_granules(), 130);
        assert_eq!(m.take(0, 1 << 30), Some((63 * 4096, 130 * 4096)));
        let huge = DirtyMap::new(1 << 62, 4096);
        assert!(huge.granule() >= (1 << 35));
        huge.mark((1 << 62) - 1, 1);
        assert_eq!(huge.dirty_granules(), 1);
    }

    #[test]
    fn concurrent_marks_are_all_seen() {
        let m = std::sync::Arc::new(DirtyMap::new(64 << 20, 4096));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1024u64 {
                        m.mark((i * 4 + t) * 4096, 4096);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("marker");
        }
        assert_eq!(m.dirty_granules(), 4096);
        let mut bytes = 0;
        while let Some((_, len)) = m.take(0, 1 << 20) {
            bytes += len;
        }
        assert_eq!(bytes, 16 << 20);
    }
}
