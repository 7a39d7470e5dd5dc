//! A raw export of a file driven by libblkio's vhost-user-blk driver, a frontend written by
//! others. The scenarios live in tests/raw_blkio/ (tests/blkio_rbd_export.rs runs them on an
//! RBD image).
#![allow(clippy::unwrap_used)]

mod common;
mod raw_blkio;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use common::*;
use raw_blkio::{Backing, DISK};

struct FileBacking(Scratch);

impl Backing for FileBacking {
    fn serve(&self, extra: &str) -> Daemon {
        Daemon::start(&raw_export(&self.0, extra), &[&self.0.socket])
    }

    fn socket(&self) -> &Path {
        &self.0.socket
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.0.image).unwrap();
        let mut out = vec![0u8; len];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut out).unwrap();
        out
    }

    fn discard_reads_zeros(&self) -> bool {
        true
    }
}

fn file(_test: &str) -> Box<dyn Backing> {
    Box::new(FileBacking(scratch(DISK)))
}

macro_rules! on_a_file {
    ($($scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $scenario() {
                raw_blkio::$scenario(&file);
            }
        )*
    };
}

on_a_file!(
    capacity_is_the_backing_size,
    writes_at_many_offsets_and_sizes_read_back_and_reach_the_backing,
    multi_segment_requests_scatter_and_gather,
    discard_and_write_zeroes_read_back_zeros,
    io_past_the_end_fails,
    two_queues_work_in_parallel,
    a_second_client_connects_after_the_first_disconnects,
    a_read_only_export_is_offered_read_only,
    many_requests_in_flight_complete_whatever_the_submit_batch,
    random_io_with_many_requests_in_flight_matches_a_model,
);
