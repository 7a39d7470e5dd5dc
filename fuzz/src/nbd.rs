//! The NBD handshake and request checks: whatever a client sends, `nbd::negotiate` answers
//! it or ends cleanly, and every request `nbd::request::check` lets through lies within the
//! export; block status answers for it are non-empty, contiguous and no longer than asked.
//!
//! Input: the client's bytes, as a stream: the handshake first, then (if it reached an
//! export) request headers of 28 bytes, a write's payload skipped as the server would.

use std::io;
use std::sync::Arc;

use thinblk::engine::memory::MemoryDevice;
use thinblk::engine::BlockDevice;
use thinblk::nbd::meta;
use thinblk::nbd::negotiate::negotiate;
use thinblk::nbd::proto::{RequestHeader, REQUEST_LEN};
use thinblk::nbd::request::{check, Command, Limits, Verdict};
use thinblk::nbd::socket::Transport;
use thinblk::nbd::{Bitmap, Exports, NbdExport};

/// Export size: a few blocks, not a whole number of 4 KiB pages.
pub const SIZE: u64 = (1 << 20) + 512;

/// The client's bytes in, the server's bytes counted (not kept).
struct Wire<'a> {
    input: &'a [u8],
    written: usize,
}

impl Transport for Wire<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > self.input.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (head, rest) = self.input.split_at(buf.len());
        buf.copy_from_slice(head);
        self.input = rest;
        Ok(())
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.written += buf.len();
        Ok(())
    }
}

fn export(name: &str, writable: bool, bitmap: bool) -> NbdExport {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE).expect("memory device"));
    let bitmap = bitmap.then(|| Bitmap {
        name: "base".into(),
        // Every other 64 KiB changed.
        changed: Box::new(|offset: u64, len: u64| {
            let mut runs = Vec::new();
            let (mut pos, end) = (offset, offset + len);
            while pos < end {
                let stop = ((pos / 65536) + 1).saturating_mul(65536).min(end);
                runs.push((stop - pos, (pos / 65536) % 2 == 1));
                pos = stop;
            }
            Ok(runs)
        }),
    });
    NbdExport {
        name: name.into(),
        description: "fuzz".into(),
        dev: dev.clone(),
        node: dev,
        writable,
        fast_zero: writable,
        bitmap,
    }
}

pub fn run(data: &[u8]) {
    let exports = Exports::default();
    exports.insert(Arc::new(export("", true, true)));
    exports.insert(Arc::new(export("ro", false, false)));
    let mut wire = Wire {
        input: data,
        written: 0,
    };
    let mut admit = |_: &Arc<NbdExport>| true;
    let Ok(session) = negotiate(&mut wire, &exports, &mut admit) else {
        return;
    };
    assert!(wire.written > 0, "the server greets first");
    let limits = Limits {
        size: session.export.size(),
        writable: session.export.writable,
        structured: session.structured,
        has_contexts: !session.contexts.is_empty(),
        fast_zero: session.export.fast_zero,
    };
    let mut rest = wire.input;
    while rest.len() >= REQUEST_LEN {
        let mut h = [0u8; REQUEST_LEN];
        h.copy_from_slice(&rest[..REQUEST_LEN]);
        rest = &rest[REQUEST_LEN..];
        let hdr = RequestHeader::decode(&h);
        let skip = match check(&hdr, &limits) {
            Verdict::Close(_) => return,
            Verdict::Refuse { skip, .. } => skip,
            Verdict::Run(req) => {
                if !matches!(req.cmd, Command::Flush | Command::Disconnect) {
                    let end = req.offset.checked_add(u64::from(req.len));
                    assert!(end.is_some_and(|e| e <= limits.size), "{req:?} passed");
                }
                if req.cmd == Command::BlockStatus {
                    for &c in &session.contexts {
                        let len = u64::from(req.len);
                        let d =
                            meta::block_status(&session.export, c, req.offset, len, req.req_one)
                                .expect("block status of a checked range");
                        assert!(!d.is_empty() && d.iter().all(|(n, _)| *n > 0));
                        let total: u64 = d.iter().map(|(n, _)| u64::from(*n)).sum();
                        assert!(total <= len, "{total} described of {len}");
                        assert!(!req.req_one || d.len() == 1);
                    }
                }
                if req.cmd == Command::Write {
                    req.len
                } else {
                    0
                }
            }
        };
        rest = &rest[(skip as usize).min(rest.len())..];
    }
}
