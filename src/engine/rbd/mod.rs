//! Ceph RBD images through librbd (no kernel module): a [`BlockDevice`](crate::engine::BlockDevice)
//! whose queues submit `rbd_aio_*` calls and collect their completions through an eventfd,
//! the image handle a metadata store builds on, and the connection both share.
//!
//! - `spec.rs`: `POOL/IMAGE`, and [`CephOptions`]: always built, so the command line and the
//!   export syntax are the same with or without Ceph.
//! - With the cargo feature `rbd` only (the default build needs no Ceph headers or
//!   libraries): `ffi.rs` (the librados calls, declared by hand; librbd's come from
//!   `rbd-sys`), `error.rs` (a failed call becomes an `io::Error` naming it, with its errno),
//!   `cluster.rs` (a connected librados handle and its per-pool I/O contexts),
//!   `image.rs` (an open image: size, resize, synchronous I/O, snapshots, the exclusive
//!   lock), `device.rs` (the block device) and `queue.rs` (its asynchronous queue),
//!   `lock.rs` (a pool's ownership: taking the images' locks, or taking them over from a
//!   lost owner by blocklisting its client).
//!
//! Ownership of an image (the exclusive lock, fencing a lost owner) is decided by whoever
//! opens it, never on the I/O path: a raw `rbd=` export leaves librbd's lock cooperative
//! (it moves to whichever client writes), a thin pool on RBD takes it and keeps it.

use std::path::PathBuf;

mod spec;

pub use spec::{RbdSpec, RbdSpecError};

#[cfg(feature = "rbd")]
mod cluster;
#[cfg(feature = "rbd")]
mod device;
#[cfg(feature = "rbd")]
mod error;
#[cfg(feature = "rbd")]
mod ffi;
#[cfg(feature = "rbd")]
mod image;
#[cfg(feature = "rbd")]
pub mod lock;
#[cfg(feature = "rbd")]
mod queue;

#[cfg(feature = "rbd")]
pub use cluster::{Cluster, IoCtx};
#[cfg(feature = "rbd")]
pub use device::{AioCounts, RbdDevice};
#[cfg(feature = "rbd")]
pub use error::{ceph_error, errno, CephError};
#[cfg(feature = "rbd")]
pub use image::{LockOwner, RbdImage, CREATE_FEATURES};

/// Whether this build can open RBD images (the cargo feature `rbd`).
pub const AVAILABLE: bool = cfg!(feature = "rbd");

/// How to reach the cluster: `--ceph-conf` and `--ceph-id`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CephOptions {
    /// The configuration file (mon addresses, keyring); `None`: librados's own search
    /// (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The cephx user without `client.` (`None`: `admin`).
    pub id: Option<String>,
}

/// Opens the image `spec` as a device (the raw `rbd=` export), on the daemon's shared
/// connection for `opts`.
#[cfg(feature = "rbd")]
pub fn open_device(
    spec: &RbdSpec,
    opts: &CephOptions,
    read_only: bool,
) -> std::io::Result<std::sync::Arc<dyn crate::engine::BlockDevice>> {
    let cluster = Cluster::shared(opts)?;
    Ok(std::sync::Arc::new(RbdDevice::open(
        &cluster, spec, read_only,
    )?))
}

/// Without the `rbd` feature there is no librbd to open images with.
#[cfg(not(feature = "rbd"))]
pub fn open_device(
    _spec: &RbdSpec,
    _opts: &CephOptions,
    _read_only: bool,
) -> std::io::Result<std::sync::Arc<dyn crate::engine::BlockDevice>> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "this thinblk was built without RBD support (cargo feature `rbd`)",
    ))
}
