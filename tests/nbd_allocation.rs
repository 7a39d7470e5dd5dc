//! The allocation questions NBD asks a thin device (`BlockDevice::allocation`, the
//! `base:allocation` context) and the pool (`Volumes::changed_runs`, the dirty bitmap
//! context), checked against a per-block model of what was written, discarded and shared.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, Volumes};
use thinblk::engine::{Allocation, BlockDevice, Bufs};

const BS: u64 = 64 << 10;
const BLOCKS: u64 = 64;

fn open(dir: &Path) -> Arc<Volumes> {
    let geometry = PoolGeometry {
        block_size: BS,
        metadata_size: 4 << 20,
        data_size: 32 << 20,
    };
    let options = PoolOptions {
        direct: false,
        error_if_no_space: true,
        ..PoolOptions::default()
    };
    let pool = Pool::open(&dir.join("metadata"), &dir.join("data"), &geometry, options).unwrap();
    Volumes::open(pool, &dir.join("devices.json")).unwrap()
}

/// Expands runs into one state per byte-range piece of `BS / 8` (so runs that start or end
/// inside blocks are checked too).
fn per_piece(runs: &[(u64, bool)], piece: u64) -> Vec<bool> {
    let mut out = Vec::new();
    for &(len, v) in runs {
        assert_eq!(len % piece, 0, "runs are whole pieces here");
        out.extend(std::iter::repeat_n(v, (len / piece) as usize));
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn allocation_is_the_thin_mapping_and_changed_runs_the_delta() {
    let dir = tempfile::tempdir().unwrap();
    let thin = open(dir.path());
    thin.create("vm", BLOCKS * BS).unwrap();
    let dev = thin.device("vm").unwrap();
    let mut mapped = vec![false; BLOCKS as usize];
    let mut rng = Rng(0x9e37_79b9);
    let data = vec![0x5au8; 4096];
    for _ in 0..40 {
        let b = rng.next() % BLOCKS;
        dev.write(b * BS + 4096, &Bufs::one(&data)).unwrap();
        mapped[b as usize] = true;
    }
    thin.snapshot("vm", "base").unwrap();
    let mut changed = vec![false; BLOCKS as usize];
    for _ in 0..30 {
        let b = rng.next() % BLOCKS;
        if rng.next().is_multiple_of(3) {
            dev.discard(b * BS, BS).unwrap();
            changed[b as usize] |= mapped[b as usize];
            mapped[b as usize] = false;
        } else {
            dev.write(b * BS, &Bufs::one(&data)).unwrap();
            mapped[b as usize] = true;
            changed[b as usize] = true;
        }
    }
    let piece = BS / 8;
    // Ranges starting and ending inside blocks, and the whole device.
    for (offset, len) in [
        (0, BLOCKS * BS),
        (3 * piece, 200 * piece),
        (BS + piece, piece),
    ] {
        let runs: Vec<(u64, bool)> = dev
            .allocation(offset, len)
            .unwrap()
            .iter()
            .map(|r| (r.len, r.state == Allocation::Data))
            .collect();
        assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), len);
        let want: Vec<bool> = (offset / piece..(offset + len) / piece)
            .map(|p| mapped[(p * piece / BS) as usize])
            .collect();
        assert_eq!(
            per_piece(&runs, piece),
            want,
            "allocation of {offset}+{len}"
        );
        let delta = thin.changed_runs("base", "vm", offset, len).unwrap();
        let want: Vec<bool> = (offset / piece..(offset + len) / piece)
            .map(|p| changed[(p * piece / BS) as usize])
            .collect();
        assert_eq!(per_piece(&delta, piece), want, "delta of {offset}+{len}");
    }
    // The whole-device answer matches `thin-delta`'s runs block for block.
    let blocks: Vec<bool> = per_piece(
        &thin.changed_runs("base", "vm", 0, BLOCKS * BS).unwrap(),
        BS,
    );
    let mut from_delta = vec![false; BLOCKS as usize];
    for r in thin.delta("base", "vm").unwrap() {
        for b in r.begin..r.begin + r.len {
            from_delta[b as usize] = true;
        }
    }
    assert_eq!(blocks, from_delta);
    // Past the end is refused, not answered.
    assert!(dev.allocation(BLOCKS * BS, 512).is_err());
}

#[test]
fn a_fresh_device_is_one_hole_and_a_snapshot_of_itself_has_no_changes() {
    let dir = tempfile::tempdir().unwrap();
    let thin = open(dir.path());
    thin.create("vm", BLOCKS * BS).unwrap();
    let dev = thin.device("vm").unwrap();
    let runs = dev.allocation(0, BLOCKS * BS).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, Allocation::Hole);
    thin.snapshot("vm", "s").unwrap();
    assert_eq!(
        thin.changed_runs("s", "vm", 0, BLOCKS * BS).unwrap(),
        vec![(BLOCKS * BS, false)]
    );
}
