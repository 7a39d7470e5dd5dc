//! Thin exports driven by libblkio's vhost-user-blk driver, on a pool of files. The scenarios
//! live in tests/thin_blkio/ (tests/blkio_rbd_pool.rs runs them on a pool on RBD).

mod common;
mod thin_blkio;

use std::path::Path;

/// A pool of files (metadata, data and catalog) in the test's directory.
fn file_pool(dir: &Path) -> Vec<String> {
    vec![
        "--dir".to_string(),
        dir.display().to_string(),
        "--metadata-size".into(),
        "16M".into(),
        "--data-size".into(),
        "256M".into(),
    ]
}

#[test]
fn a_thin_disk_reads_zeros_until_written_and_keeps_data_across_restarts() {
    thin_blkio::a_thin_disk_reads_zeros_until_written_and_keeps_data_across_restarts(&file_pool);
}

#[test]
fn discard_and_write_zeroes_give_blocks_back() {
    thin_blkio::discard_and_write_zeroes_give_blocks_back(&file_pool);
}

#[test]
fn first_writes_from_two_queues_into_the_same_blocks_lose_nothing() {
    thin_blkio::first_writes_from_two_queues_into_the_same_blocks_lose_nothing(&file_pool);
}

#[test]
fn a_snapshot_export_keeps_the_data_of_when_it_was_taken() {
    thin_blkio::a_snapshot_export_keeps_the_data_of_when_it_was_taken(&file_pool);
}

#[test]
fn first_writes_in_flight_together_land_whole_with_zeros_around() {
    thin_blkio::first_writes_in_flight_together_land_whole_with_zeros_around(&file_pool);
}

#[test]
fn random_requests_match_a_byte_image_of_the_disk() {
    thin_blkio::random_requests_match_a_byte_image_of_the_disk(&file_pool);
}

#[test]
fn a_client_that_reconnects_finds_its_writes() {
    thin_blkio::a_client_that_reconnects_finds_its_writes(&file_pool);
}
