//! The vhost-user-blk device: virtio framing and the vhost-user protocol, nothing of thin
//! provisioning. Requests are parsed ([`request`]), checked against the device size and run
//! ([`execute`]) on a [`crate::engine::BlockDevice`].

pub mod accept_loop;
pub mod backend;
pub mod cache_mode;
pub mod chain;
pub mod config;
pub mod connection;
pub mod dirty_log;
pub mod event_thread;
pub mod execute;
pub mod export;
pub mod frontend_checks;
pub mod guest_memory_guard;
pub mod handover;
pub mod inflight;
pub mod memory_table;
pub mod poll_window;
pub mod request;
pub mod sigbus;
pub mod worker_pool;

pub use backend::{BlkBackend, DeviceSettings, MAX_QUEUES, MAX_QUEUE_SIZE};
pub use execute::{ExecuteError, Failure, FailureSink};
pub use export::Export;

#[cfg(test)]
mod queue_tests;
