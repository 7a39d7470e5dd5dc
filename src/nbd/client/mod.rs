//! An NBD client, for the mirror job: it writes a device's blocks into another server's
//! export (another thinblk, `qemu-nbd`, qemu-storage-daemon: any standard NBD server).
//!
//! - `uri.rs`: `nbd://HOST:PORT/NAME` and `nbd+unix:///NAME?socket=PATH`.
//! - `handshake.rs`: fixed newstyle negotiation (STRUCTURED_REPLY, GO with block sizes;
//!   EXPORT_NAME for servers without GO).
//! - `connection.rs`: `NbdClient`: requests checked against what the export allows, sent
//!   from any thread, several in flight (a bounded window), each completed by a callback.
//! - `reader.rs`: the reply thread: simple and structured replies, matched by cookie and
//!   checked against their request before any payload is accepted; a server owing replies
//!   and silent for the reply timeout loses the connection.
//! - `fuzzing.rs`: the reply parser on a byte stream (the `nbd_client` fuzz target).
//!
//! Whatever the server sends is untrusted: a malformed or unexpected reply ends the
//! connection, and every request in flight then fails with `ReplyError::Lost`. No TLS.

mod connection;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod reader;
#[cfg(test)]
mod tests;
pub mod uri;

use std::io;

pub use connection::{Command, Done, HangUp, NbdClient, DEFAULT_IN_FLIGHT, DEFAULT_REPLY_TIMEOUT};
pub use handshake::ExportInfo;
pub use uri::{NbdUri, Target, UriError};

/// Why a request failed, once it was sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The server answered with an error (an NBD errno, and its message if it gave one).
    #[error("NBD server error {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server { errno: u32, message: String },
    /// The connection ended (or the server broke the protocol) before the reply.
    #[error("NBD connection lost: {0}")]
    Lost(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("connecting to {0}: {1}")]
    Connect(String, io::Error),
    #[error("NBD I/O: {0}")]
    Io(#[from] io::Error),
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    #[error("the NBD server refused {option} (reply {reply:#x}): {message}")]
    Refused {
        option: &'static str,
        reply: u32,
        message: String,
    },
    /// The export does not offer this (read-only, or no TRIM / WRITE_ZEROES / FUA).
    #[error("the NBD export does not support {0}")]
    Unsupported(&'static str),
    /// A request past the export's end, empty, or longer than the server takes.
    #[error("bad NBD request: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

impl ClientError {
    fn protocol(what: &str) -> ClientError {
        ClientError::Protocol(what.to_string())
    }
}
