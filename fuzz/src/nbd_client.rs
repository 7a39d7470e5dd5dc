//! The NBD client's reply parser (`nbd::client`, src/nbd/client/reader.rs): whatever a
//! server sends, the parser ends, completes each of five waiting requests exactly once, and
//! a read that succeeds gets exactly the bytes it asked for (checked inside
//! `nbd::client::fuzzing::parse_replies`).
//!
//! Input: one mode byte (bit 0: structured replies were negotiated), then the server's
//! bytes. The waiting requests have cookies 1 to 5 (`fuzzing::REQUESTS`).

use thinblk::nbd::client::fuzzing::parse_replies;

pub fn run(data: &[u8]) {
    let Some((&mode, replies)) = data.split_first() else {
        return;
    };
    parse_replies(mode & 1 != 0, replies);
}
