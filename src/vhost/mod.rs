//! The vhost-user-blk device.
