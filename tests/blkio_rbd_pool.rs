//! The blkio scenarios of a thin export (tests/thin_blkio/: reads, writes, flush, discard,
//! write-zeroes, snapshots, two queues, a random model check, reconnects, restarts) on a pool
//! whose metadata and data devices are RBD images.
//!
//! Needs a Ceph cluster: THINBLK_CEPH_CONF names its ceph.conf (scripts/test.sh starts one with
//! scripts/ceph-cluster.sh, pool `thinblk`). A test fails when it is not set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod rbd_common;
mod thin_blkio;

use std::path::Path;

use thinblk::engine::rbd::RbdImage;

/// A pool on two RBD images named for one test (unique across tests and runs, so tests run in
/// parallel against one cluster); the daemon creates them on its first start. They are removed
/// when the test ends if they can be: today a stopped daemon's watch on them lingers until the
/// cluster times it out (30 s), so they are usually left to the throwaway cluster.
struct RbdPool {
    conf: String,
    meta: String,
    data: String,
}

impl RbdPool {
    fn new(test: &str) -> RbdPool {
        let tag = rbd_common::unique_name(test);
        RbdPool {
            // First, so that without a cluster the test fails here, before any clean-up runs.
            conf: rbd_common::ceph_conf().display().to_string(),
            meta: format!("{tag}-meta"),
            data: format!("{tag}-data"),
        }
    }

    /// `serve` arguments opening this pool, with the catalog in `dir`.
    fn args(&self, dir: &Path) -> Vec<String> {
        let pool = rbd_common::POOL;
        vec![
            "--dir".to_string(),
            dir.display().to_string(),
            "--metadata".into(),
            format!("rbd:{pool}/{}", self.meta),
            "--data".into(),
            format!("rbd:{pool}/{}", self.data),
            "--metadata-size".into(),
            "16M".into(),
            "--data-size".into(),
            "256M".into(),
            "--ceph-conf".into(),
            self.conf.clone(),
        ]
    }
}

impl Drop for RbdPool {
    /// Best effort: an image left behind only costs space in a throwaway cluster.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // keep a failed test's images to look at
        }
        let cluster = rbd_common::connect();
        let io = rbd_common::pool(&cluster);
        for name in [&self.meta, &self.data] {
            if let Err(e) = RbdImage::remove(&io, name) {
                eprintln!("could not remove test image {name}: {e}");
            }
        }
    }
}

/// Runs `scenario` on a new pool on RBD.
fn on_rbd(test: &str, scenario: fn(thin_blkio::PoolArgs)) {
    let pool = RbdPool::new(test);
    scenario(&|dir: &Path| pool.args(dir));
}

#[test]
fn a_thin_disk_reads_zeros_until_written_and_keeps_data_across_restarts() {
    on_rbd(
        "restarts",
        thin_blkio::a_thin_disk_reads_zeros_until_written_and_keeps_data_across_restarts,
    );
}

#[test]
fn discard_and_write_zeroes_give_blocks_back() {
    on_rbd(
        "discard",
        thin_blkio::discard_and_write_zeroes_give_blocks_back,
    );
}

#[test]
fn first_writes_from_two_queues_into_the_same_blocks_lose_nothing() {
    on_rbd(
        "two-queues",
        thin_blkio::first_writes_from_two_queues_into_the_same_blocks_lose_nothing,
    );
}

#[test]
fn a_snapshot_export_keeps_the_data_of_when_it_was_taken() {
    on_rbd(
        "snapshot",
        thin_blkio::a_snapshot_export_keeps_the_data_of_when_it_was_taken,
    );
}

#[test]
fn first_writes_in_flight_together_land_whole_with_zeros_around() {
    on_rbd(
        "in-flight",
        thin_blkio::first_writes_in_flight_together_land_whole_with_zeros_around,
    );
}

#[test]
fn random_requests_match_a_byte_image_of_the_disk() {
    on_rbd(
        "model",
        thin_blkio::random_requests_match_a_byte_image_of_the_disk,
    );
}

#[test]
fn a_client_that_reconnects_finds_its_writes() {
    on_rbd(
        "reconnect",
        thin_blkio::a_client_that_reconnects_finds_its_writes,
    );
}
