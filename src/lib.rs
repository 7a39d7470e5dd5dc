//! thinblk: thin-provisioned block storage for virtual machines, served over vhost-user-blk.
//!
//! Layers, top to bottom (see `docs/architecture.md`):
//! - [`vhost`]: the vhost-user-blk device; knows virtio, nothing of thin provisioning.
//! - [`engine`]: block devices behind the [`engine::BlockDevice`] trait; knows nothing of virtio.
//! - [`bufio`]: the cache of metadata blocks; the only code that touches the metadata device.

pub mod bufio;
pub mod engine;
pub mod nbd;
pub mod vhost;

pub mod config_file;
pub mod control;
pub mod daemon;
pub mod export_spec;
pub mod generate;
pub mod mirror;
mod signals;
pub mod socket_access;
pub mod sockets;
pub mod tools;
