//! A pool on RBD gives its images back when it is closed, not when the process ends: their
//! exclusive locks and watches go with them, so the same process (a daemon reloading its
//! configuration, a test) opens the pool again without `--take-over`, and another client can
//! remove the images at once.
//!
//! Needs a Ceph cluster: THINBLK_CEPH_CONF names its ceph.conf (scripts/test.sh starts one with
//! scripts/ceph-cluster.sh, pool `thinblk`). A test fails when it is not set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod rbd_common;

use thinblk::daemon::rbd_pool::{self, RbdPoolSpec};
use thinblk::engine::rbd::RbdImage;
use thinblk::engine::thin::{PoolGeometry, PoolOptions};

#[test]
fn a_closed_pool_releases_its_images() {
    let tag = rbd_common::unique_name("release");
    let (meta, data) = (format!("{tag}-meta"), format!("{tag}-data"));
    let spec = RbdPoolSpec {
        metadata: format!("{}/{meta}", rbd_common::POOL),
        data: format!("{}/{data}", rbd_common::POOL),
        ceph: rbd_common::options(),
        take_over: false,
        standby: false,
    };
    let geometry = PoolGeometry {
        block_size: 64 << 10,
        metadata_size: 16 << 20,
        data_size: 64 << 20,
    };
    let pool = rbd_pool::open(&spec, &geometry, PoolOptions::default()).unwrap();
    pool.change(|m| m.create_thin(1)).unwrap();
    pool.commit().unwrap();
    pool.close();
    drop(pool);

    // The same process opens it again as its only owner, without taking it over.
    let pool = rbd_pool::open(&spec, &geometry, PoolOptions::default())
        .expect("the closed pool's images still hold their locks");
    assert!(
        pool.meta().device_ids().contains(&1),
        "thin device 1 is gone"
    );
    pool.close();
    drop(pool);

    // Another client finds them closed: no watcher keeps them from being removed.
    let cluster = rbd_common::connect();
    let io = rbd_common::pool(&cluster);
    for name in [&meta, &data] {
        RbdImage::remove(&io, name).unwrap_or_else(|e| panic!("removing {name}: {e}"));
    }
}

/// A daemon's clean stop (SIGTERM) closes its pool's images: no watch of the exited process
/// lingers in the cluster (for 30 s, until the OSD times it out), so the images can be
/// removed at once, as `rbd rm` would.
#[test]
fn a_daemon_stopped_cleanly_leaves_no_watch_on_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let tag = rbd_common::unique_name("stopped");
    let (meta, data) = (format!("{tag}-meta"), format!("{tag}-data"));
    let sock = dir.path().join("vm.sock");
    let conf = rbd_common::ceph_conf().display().to_string();
    let args: Vec<String> = [
        "--dir",
        &dir.path().display().to_string(),
        "--metadata",
        &format!("rbd:{}/{meta}", rbd_common::POOL),
        "--data",
        &format!("rbd:{}/{data}", rbd_common::POOL),
        "--metadata-size",
        "16M",
        "--data-size",
        "64M",
        "--ceph-conf",
        &conf,
        "--export",
        &format!("name=vm,size=16M,socket={}", sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = common::Daemon::start(&args, &[&sock]);
    // SIGTERM, and reaped.
    drop(daemon);

    let cluster = rbd_common::connect();
    let io = rbd_common::pool(&cluster);
    for name in [&meta, &data] {
        RbdImage::remove(&io, name).unwrap_or_else(|e| {
            panic!("removing {name} right after the daemon stopped (a watch lingers?): {e}")
        });
    }
}
