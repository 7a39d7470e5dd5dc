//! The reply parser on a byte stream, without socket or threads, for the fuzz target
//! `nbd_client` (fuzz/src/nbd_client.rs) and its regression inputs.
//!
//! Five requests wait under cookies 1 to 5 (two reads, a write, a write of zeroes, a
//! flush); the bytes are what the server sends. Whatever they are, the parser must end (at
//! the end of the bytes if not before), complete every request exactly once, and hand a
//! successful read exactly the bytes it asked for.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::connection::Shared;
use super::handshake::ExportInfo;
use crate::nbd::proto::*;
use crate::nbd::socket::Transport;

/// The requests waiting: kind, offset, length.
pub const REQUESTS: [(u16, u64, u32); 5] = [
    (CMD_READ, 0, 4096),
    (CMD_WRITE, 4096, 512),
    (CMD_READ, 65536, 65536),
    (CMD_WRITE_ZEROES, 1 << 20, 1 << 20),
    (CMD_FLUSH, 0, 0),
];

struct Bytes<'a>(&'a [u8]);

impl Transport for Bytes<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > self.0.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (head, rest) = self.0.split_at(buf.len());
        buf.copy_from_slice(head);
        self.0 = rest;
        Ok(())
    }
    fn write_all(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// Parses `bytes` as replies to `REQUESTS` (structured replies negotiated or not); panics
/// if a request is completed twice, never, or a read with data of the wrong length.
/// Returns how many requests succeeded.
#[doc(hidden)]
pub fn parse_replies(structured: bool, bytes: &[u8]) -> usize {
    let shared = Shared::new(REQUESTS.len(), Duration::from_secs(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    for (kind, offset, len) in REQUESTS {
        let (calls, ok) = (calls.clone(), ok.clone());
        let done = Box::new(move |r: Result<Vec<u8>, super::ReplyError>| {
            calls.fetch_add(1, Ordering::SeqCst);
            if let Ok(data) = r {
                let want = if kind == CMD_READ { len as usize } else { 0 };
                assert_eq!(data.len(), want, "a reply's data for {kind} of {len} bytes");
                ok.fetch_add(1, Ordering::SeqCst);
            }
        });
        let taken = shared.register(kind, offset, len, done);
        assert!(taken.is_ok(), "a fresh connection takes its first requests");
    }
    let info = ExportInfo {
        size: 4 << 20,
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES,
        structured,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
    };
    super::reader::run(&shared, &mut Bytes(bytes), info);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        REQUESTS.len(),
        "every request completes once"
    );
    let st = shared.state.lock();
    assert!(st.pending.is_empty() && st.completing == 0);
    ok.load(Ordering::SeqCst)
}
