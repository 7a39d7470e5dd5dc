//! A raw `rbd=` export driven by libblkio's vhost-user-blk driver: the scenarios of
//! tests/raw_blkio/ (those of a file's raw export) on an RBD image of the test cluster, RBD
//! snapshots over QMP, and a missing image. Needs THINBLK_CEPH_CONF (see tests/rbd_common).
#![allow(clippy::unwrap_used)]

mod common;
mod raw_blkio;
mod rbd_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use raw_blkio::{Backing, DISK};
use rbd_common::*;
use thinblk::engine::rbd::{Cluster, IoCtx, RbdImage};

/// An image of the test cluster and where its export's sockets go.
struct RbdScratch {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    control: PathBuf,
    image: String,
    _cluster: Arc<Cluster>,
    io: Arc<IoCtx>,
}

fn scratch(what: &str) -> RbdScratch {
    let dir = tempfile::tempdir().unwrap();
    let cluster = connect();
    let io = pool(&cluster);
    let image = new_image(&io, what, DISK);
    RbdScratch {
        socket: dir.path().join("disk.sock"),
        control: dir.path().join("control.sock"),
        _dir: dir,
        image,
        _cluster: cluster,
        io,
    }
}

impl RbdScratch {
    fn args(&self, extra: &str) -> Vec<String> {
        vec![
            "--ceph-conf".into(),
            ceph_conf().display().to_string(),
            "--control".into(),
            self.control.display().to_string(),
            "--export".into(),
            format!(
                "rbd={POOL}/{},socket={}{extra}",
                self.image,
                self.socket.display()
            ),
        ]
    }

    fn serve(&self, extra: &str) -> Daemon {
        Daemon::start(&self.args(extra), &[&self.socket, &self.control])
    }

    /// The image's bytes as another librbd client reads them.
    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let image = RbdImage::open(&self.io, &self.image, true).unwrap();
        let mut out = vec![0u8; len];
        image.read(offset, &mut out).unwrap();
        out
    }
}

impl Backing for RbdScratch {
    fn serve(&self, extra: &str) -> Daemon {
        RbdScratch::serve(self, extra)
    }

    fn socket(&self) -> &Path {
        &self.socket
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.image_bytes(offset, len)
    }

    fn discard_reads_zeros(&self) -> bool {
        false
    }
}

fn image(test: &str) -> Box<dyn Backing> {
    Box::new(scratch(test))
}

macro_rules! on_an_image {
    ($($scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $scenario() {
                raw_blkio::$scenario(&image);
            }
        )*
    };
}

on_an_image!(
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

#[test]
fn blockdev_snapshot_internal_sync_takes_an_rbd_snapshot() {
    let s = scratch("qmpsnap");
    let _d = s.serve(",id=vm");
    let mut c = Client::connect(&s.socket, 1);
    raw_blkio::write_pattern(&mut c, 1, 0, 65536);
    let mut qmp = Qmp::connect(&s.control);
    let r = qmp.ok(
        "blockdev-snapshot-internal-sync",
        serde_json::json!({"device": "vm", "name": "before-upgrade"}),
    );
    assert_eq!(r, serde_json::json!({}));
    let image = RbdImage::open(&s.io, &s.image, true).unwrap();
    assert_eq!(image.snapshots().unwrap(), ["before-upgrade"]);
    let again = qmp.exec(
        "blockdev-snapshot-internal-sync",
        serde_json::json!({"device": "vm", "name": "before-upgrade"}),
    );
    let desc = again["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("rbd_snap_create"), "{again}");
    // The guest goes on writing after the snapshot.
    raw_blkio::write_pattern(&mut c, 2, 0, 65536);
}

#[test]
fn a_missing_image_stops_the_daemon_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .arg("--ceph-conf")
        .arg(ceph_conf())
        .arg("--export")
        .arg(format!(
            "rbd={POOL}/{},socket={}",
            unique_name("missing"),
            dir.path().join("s.sock").display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening the RBD image thinblk/missing-"),
        "{err}"
    );
    assert!(err.contains("rbd_open"), "{err}");
}
