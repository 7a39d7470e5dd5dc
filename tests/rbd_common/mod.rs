//! The Ceph cluster the RBD tests run against: `THINBLK_CEPH_CONF` names its ceph.conf
//! (scripts/test.sh starts one with scripts/ceph-cluster.sh). Without it the tests fail:
//! a test that needs Ceph never passes without having talked to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thinblk::engine::rbd::{CephOptions, Cluster, IoCtx, RbdImage};

/// The pool scripts/ceph-cluster.sh creates.
pub const POOL: &str = "thinblk";

pub fn ceph_conf() -> PathBuf {
    match std::env::var_os("THINBLK_CEPH_CONF") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "THINBLK_CEPH_CONF is not set: these tests need a Ceph cluster \
             (bash scripts/ceph-cluster.sh start DIR, then THINBLK_CEPH_CONF=DIR/ceph.conf)"
        ),
    }
}

pub fn options() -> CephOptions {
    CephOptions {
        conf: Some(ceph_conf()),
        id: None,
    }
}

/// A new connection: a client of its own (as another host would be).
pub fn connect() -> Arc<Cluster> {
    Cluster::connect(&options()).expect("connecting to the test cluster")
}

pub fn pool(cluster: &Arc<Cluster>) -> Arc<IoCtx> {
    cluster.ioctx(POOL).expect("the test pool")
}

/// An image name no other test (or earlier run against the same cluster) uses.
pub fn unique_name(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{what}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

/// A new image of `size` bytes; its name.
pub fn new_image(io: &IoCtx, what: &str, size: u64) -> String {
    let name = unique_name(what);
    RbdImage::create(io, &name, size).expect("creating a test image");
    name
}
