//! The reply thread of an `NbdClient`: reads replies, matches them to requests by cookie and
//! completes them. Every reply is checked against its request before its payload is read
//! (a chunk of data must lie inside the read it answers, lengths are bounded), so a broken
//! or hostile server costs the connection, never memory or a wrong completion.
//!
//! The parser reads any `Transport` (fuzz/src/nbd_client.rs feeds it bytes); on a socket it
//! reads through `Patient`, which gives up on a server that owes replies and is silent.

use std::io;
use std::time::Instant;

use super::connection::{Pending, Shared};
use super::handshake::ExportInfo;
use super::ReplyError;
use crate::nbd::proto::*;
use crate::nbd::socket::{Socket, Transport};

/// Structured reply types the client knows besides those of proto.rs.
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// Payloads of chunks other than data are small (an error message is at most 4096 bytes).
const MAX_CHUNK_META: u32 = 64 << 10;

type Violation = String;

/// The reply thread's body on a socket whose reads time out every tick.
pub(super) fn run_socket(shared: &Shared, sock: Socket, info: ExportInfo) {
    let mut patient = Patient {
        sock,
        shared,
        last_byte: Instant::now(),
    };
    run(shared, &mut patient, info);
}

/// Reads replies until the stream ends or breaks the protocol; then fails what is left.
pub(super) fn run<T: Transport>(shared: &Shared, sock: &mut T, info: ExportInfo) {
    let why = loop {
        if let Err(why) = one_reply(shared, sock, &info) {
            break why;
        }
    };
    shared.fail_all(why);
}

/// A socket read that waits while the server owes nothing, and fails once it owes a reply
/// and has sent no byte for the reply timeout (counted from the later of its last byte and
/// the oldest request waiting).
struct Patient<'a> {
    sock: Socket,
    shared: &'a Shared,
    last_byte: Instant,
}

impl Transport for Patient<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let rest = &mut buf[at..];
            // SAFETY: `rest` is our own buffer, valid for writes of its length.
            let n = unsafe { libc::recv(self.sock.fd(), rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n > 0 {
                at += n as usize;
                self.last_byte = Instant::now();
                continue;
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    let Some(owed) = self.shared.owed_since() else {
                        continue;
                    };
                    let timeout = self.shared.reply_timeout;
                    if owed.max(self.last_byte).elapsed() >= timeout {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the server sent nothing for {timeout:?} while owing replies"),
                        ));
                    }
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all(&mut self, _: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

fn read<const N: usize>(sock: &mut impl Transport) -> Result<[u8; N], Violation> {
    let mut b = [0u8; N];
    sock.read_exact(&mut b).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => format!("reading a reply: {e}"),
    })?;
    Ok(b)
}

fn payload<T: Transport>(sock: &mut T, len: usize) -> Result<Vec<u8>, Violation> {
    let mut v = vec![0u8; len];
    sock.read_exact(&mut v)
        .map_err(|e| format!("reading a reply's payload: {e}"))?;
    Ok(v)
}

/// What a reply needs to know of its request.
fn request_of(shared: &Shared, cookie: u64) -> Result<(u16, u64, u32), Violation> {
    let st = shared.state.lock();
    match st.pending.get(&cookie) {
        Some(p) => Ok((p.kind, p.offset, p.len)),
        None => Err(format!("a reply to unknown cookie {cookie:#x}")),
    }
}

/// Applies `f` to the request, then completes it if `last`.
fn update(shared: &Shared, cookie: u64, last: bool, f: impl FnOnce(&mut Pending)) {
    let done = {
        let mut st = shared.state.lock();
        let Some(p) = st.pending.get_mut(&cookie) else {
            return;
        };
        f(p);
        if !last {
            return;
        }
        st.completing += 1;
        st.pending.remove(&cookie)
    };
    shared.room.notify_all();
    if let Some(p) = done {
        let result = match p.error {
            Some(e) => Err(e),
            None if p.kind == CMD_READ && p.got != u64::from(p.len) => Err(ReplyError::Server {
                errno: EIO,
                message: "the server's reply did not cover the whole read".into(),
            }),
            None => Ok(p.buf),
        };
        (p.done)(result);
        shared.completed(1);
    }
}

fn one_reply<T: Transport>(
    shared: &Shared,
    sock: &mut T,
    info: &ExportInfo,
) -> Result<(), Violation> {
    let magic = u32::from_be_bytes(read::<4>(sock)?);
    match magic {
        SIMPLE_REPLY_MAGIC => simple(shared, sock),
        STRUCTURED_REPLY_MAGIC if info.structured => chunk(shared, sock),
        _ => Err(format!("bad reply magic {magic:#x}")),
    }
}

fn simple<T: Transport>(shared: &Shared, sock: &mut T) -> Result<(), Violation> {
    let b = read::<12>(sock)?;
    let errno = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let cookie = u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]);
    let (kind, _, len) = request_of(shared, cookie)?;
    // A successful simple reply to a read carries the data; an error carries none.
    let data = if kind == CMD_READ && errno == 0 {
        Some(payload(sock, len as usize)?)
    } else {
        None
    };
    update(shared, cookie, true, |p| match data {
        Some(d) => {
            p.buf = d;
            p.got = u64::from(p.len);
        }
        None if errno != 0 => {
            p.error = Some(ReplyError::Server {
                errno,
                message: String::new(),
            })
        }
        None => {}
    });
    Ok(())
}

fn chunk<T: Transport>(shared: &Shared, sock: &mut T) -> Result<(), Violation> {
    let b = read::<16>(sock)?;
    let flags = u16::from_be_bytes([b[0], b[1]]);
    let kind = u16::from_be_bytes([b[2], b[3]]);
    let cookie = u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]);
    let length = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    let last = flags & REPLY_FLAG_DONE != 0;
    let (req_kind, req_off, req_len) = request_of(shared, cookie)?;
    let req_end = req_off + u64::from(req_len);
    match kind {
        REPLY_TYPE_NONE => {
            if length != 0 || !last {
                return Err("a NONE chunk with a payload or without DONE".into());
            }
            update(shared, cookie, true, |_| {});
        }
        REPLY_TYPE_OFFSET_DATA => {
            if req_kind != CMD_READ || length <= 8 || length - 8 > req_len {
                return Err("a data chunk that does not fit its request".into());
            }
            let offset = u64::from_be_bytes(read::<8>(sock)?);
            let n = length - 8;
            // The server chose the offset: its end may not fit in 64 bits.
            let inside = offset
                .checked_add(u64::from(n))
                .is_some_and(|end| offset >= req_off && end <= req_end);
            if !inside {
                return Err("a data chunk outside its read".into());
            }
            let data = payload(sock, n as usize)?;
            let at = (offset - req_off) as usize;
            update(shared, cookie, last, |p| {
                if at == 0 && n == p.len {
                    p.buf = data;
                } else {
                    p.buf[at..at + n as usize].copy_from_slice(&data);
                }
                p.got += u64::from(n);
            });
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if req_kind != CMD_READ || length != 12 {
                return Err("a hole chunk that does not fit its request".into());
            }
            let b = read::<12>(sock)?;
            let offset = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            let n = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
            let inside = offset
                .checked_add(u64::from(n))
                .is_some_and(|end| offset >= req_off && end <= req_end);
            if n == 0 || !inside {
                return Err("a hole chunk outside its read".into());
            }
            let at = (offset - req_off) as usize;
            update(shared, cookie, last, |p| {
                p.buf[at..at + n as usize].fill(0);
                p.got += u64::from(n);
            });
        }
        k if k & (1 << 15) != 0 => {
            if !(6..=MAX_CHUNK_META).contains(&length) {
                return Err("an error chunk of a bad length".into());
            }
            let body = payload(sock, length as usize)?;
            let errno = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let msg_len = usize::from(u16::from_be_bytes([body[4], body[5]]));
            let extra = if k == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            let known = k == REPLY_TYPE_ERROR || k == REPLY_TYPE_ERROR_OFFSET;
            if known && 6 + msg_len + extra != body.len() {
                return Err("an error chunk whose message does not fit".into());
            }
            let message = body
                .get(6..6 + msg_len)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            // Error 0 is not an error the spec allows; it is still a failed request.
            let errno = if errno == 0 { EIO } else { errno };
            update(shared, cookie, last, |p| {
                p.error.get_or_insert(ReplyError::Server { errno, message });
            });
        }
        // No meta context was asked for, so no BLOCK_STATUS may come; nothing else is known.
        _ => return Err(format!("an unexpected reply chunk of type {kind}")),
    }
    Ok(())
}
