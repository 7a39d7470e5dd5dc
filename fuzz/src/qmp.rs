//! The QMP byte stream: `control::json_stream::next_piece` must never panic and always make
//! progress, and a whole session's replies (`control::replies`, every command handler with
//! arbitrary arguments) on a daemon with no block nodes must be well formed.
//!
//! Input: a mode byte, then the client's bytes. Mode bit 0 negotiates capabilities first so
//! the command handlers are reached at once.

use serde_json::Value;
use thinblk::control::json_stream::{next_piece, Piece, MAX_TEXT};
use thinblk::control::replies;
use thinblk::daemon::state::State;

/// Cuts the whole buffer as a connection would, checking every step.
fn split_all(mut buf: &[u8]) {
    loop {
        match next_piece(buf) {
            Piece::Text(n) | Piece::Garbage(n) => {
                assert!(
                    n > 0 && n <= buf.len(),
                    "piece of {n} in {} bytes",
                    buf.len()
                );
                buf = &buf[n..];
            }
            Piece::Incomplete => {
                assert!(buf.len() <= MAX_TEXT, "an endless text is never cut off");
                return;
            }
            Piece::TooLong => return,
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    split_all(bytes);
    let mut stream = Vec::with_capacity(bytes.len() + 40);
    if mode & 1 == 1 {
        stream.extend_from_slice(br#"{"execute":"qmp_capabilities"}"#);
    }
    stream.extend_from_slice(bytes);
    let state = State::new(None);
    for r in replies(&state, &stream) {
        let Value::Object(m) = &r else {
            panic!("reply is not an object: {r}");
        };
        assert!(
            m.contains_key("return") != m.contains_key("error"),
            "reply has neither or both of return and error: {r}"
        );
    }
    assert!(state.exports().is_empty());
}
