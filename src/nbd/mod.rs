//! The NBD server: a second frontend beside `vhost/`, framing and protocol only, onto the
//! same asynchronous device seam (`BlockDevice::open_queue`). It knows nothing of virtio or
//! thin provisioning: allocation and dirty maps are questions it asks the device (and a
//! closure the daemon gives it).
//!
//! - `proto.rs`: the protocol's numbers and the request header.
//! - `negotiate.rs`: fixed newstyle option haggling.
//! - `request.rs`: judging a request header (the one place limits are checked).
//! - `transmission.rs`: a connection's requests in flight and their replies.
//! - `reply.rs`: simple and structured replies.
//! - `meta.rs`: meta contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`).
//! - `export.rs`: exports and their table; `listener.rs`: the server and its connections.
//! - `socket.rs`, `buffer.rs`: the client socket, and request buffers.
//! - `client/`: an NBD client (the mirror job writes into other servers' exports with it).
//!
//! No TLS: serve on a unix socket, or TCP on a trusted network only (SECURITY.md).

mod buffer;
pub mod client;
pub mod export;
pub mod listener;
pub mod meta;
pub mod negotiate;
pub mod proto;
pub mod reply;
pub mod request;
pub mod socket;
pub mod transmission;

pub use export::{Bitmap, Exports, NbdExport};
pub use listener::{NbdAddr, NbdError, NbdServer};
