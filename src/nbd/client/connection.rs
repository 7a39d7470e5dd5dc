//! `NbdClient`: one connection to one export. Any thread may submit; a request is
//! registered under a fresh cookie before its bytes go out (its reply may come before
//! `send` returns), and the reply thread (`reader.rs`) completes it by calling its `Done`.
//! At most `max_in_flight` requests wait for replies: a submitter past that waits for one.
//! A server that owes replies and sends nothing for the reply timeout loses the connection
//! (its requests fail with `ReplyError::Lost`), so no caller waits forever on it.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::handshake::{negotiate, ExportInfo};
use super::uri::{NbdUri, Target};
use super::{ClientError, ReplyError};
use crate::nbd::proto::*;
use crate::nbd::socket::Socket;

/// Requests in flight per connection unless told otherwise (thinblk's server reads up to
/// 64; QEMU's nbd driver keeps 16).
pub const DEFAULT_IN_FLIGHT: usize = 16;

/// How long connecting and negotiating may take before the server is given up on.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server that owes replies may send nothing, unless told otherwise (a flush of
/// a big write cache on a slow disk stays well below it).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request. Writes borrow their data: it is on the socket before `submit` returns.
#[derive(Clone, Copy, Debug)]
pub enum Command<'a> {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: &'a [u8],
        fua: bool,
    },
    /// Zeroes that may be holes on the target (NO_HOLE is never set: a hole stays a hole).
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Flush,
}

/// Called once per submitted request with its result: the data of a read, empty otherwise.
/// It runs on the reply thread, so it must not wait for other replies of this client.
pub type Done = Box<dyn FnOnce(Result<Vec<u8>, ReplyError>) + Send>;

/// A request waiting for its reply.
pub(super) struct Pending {
    pub kind: u16,
    pub offset: u64,
    pub len: u32,
    /// A read's data as chunks arrive (zeros until then), and how many bytes came.
    pub buf: Vec<u8>,
    pub got: u64,
    pub error: Option<ReplyError>,
    pub done: Done,
    /// When it was registered: the server owes a reply from then on.
    pub sent: Instant,
}

pub(super) struct State {
    next_cookie: u64,
    pub pending: HashMap<u64, Pending>,
    /// Requests answered whose `Done` is running: `drain` waits for them as well.
    pub completing: usize,
    /// Why the connection ended: no request is taken after that.
    pub failed: Option<String>,
}

pub(super) struct Shared {
    pub state: Mutex<State>,
    /// Signalled when a request completes (room in the window, or nothing left).
    pub room: Condvar,
    max_in_flight: usize,
    pub reply_timeout: Duration,
}

impl Shared {
    pub fn new(max_in_flight: usize, reply_timeout: Duration) -> Shared {
        Shared {
            state: Mutex::new(State {
                next_cookie: 1,
                pending: HashMap::new(),
                completing: 0,
                failed: None,
            }),
            room: Condvar::new(),
            max_in_flight: max_in_flight.max(1),
            reply_timeout,
        }
    }

    /// Registers a request; its cookie, or why the connection ended.
    pub fn register(&self, kind: u16, offset: u64, len: u32, done: Done) -> Result<u64, String> {
        let mut st = self.state.lock();
        while st.failed.is_none() && st.pending.len() >= self.max_in_flight {
            self.room.wait(&mut st);
        }
        if let Some(why) = &st.failed {
            return Err(why.clone());
        }
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        let buf = if kind == CMD_READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        st.pending.insert(
            cookie,
            Pending {
                kind,
                offset,
                len,
                buf,
                got: 0,
                error: None,
                done,
                sent: Instant::now(),
            },
        );
        Ok(cookie)
    }

    /// Since when the server owes a reply (the oldest request waiting), if it owes any.
    pub fn owed_since(&self) -> Option<Instant> {
        self.state.lock().pending.values().map(|p| p.sent).min()
    }

    /// Ends the connection: every request in flight fails with `why`, none is taken after.
    pub fn fail_all(&self, why: String) {
        let pending: Vec<Pending> = {
            let mut st = self.state.lock();
            st.failed.get_or_insert(why.clone());
            let all: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
            st.completing += all.len();
            all
        };
        self.room.notify_all();
        let n = pending.len();
        for p in pending {
            (p.done)(Err(ReplyError::Lost(why.clone())));
        }
        self.completed(n);
    }

    /// `n` requests' `Done`s have returned.
    pub fn completed(&self, n: usize) {
        if n > 0 {
            self.state.lock().completing -= n;
            self.room.notify_all();
        }
    }
}

pub struct NbdClient {
    info: ExportInfo,
    uri: NbdUri,
    shared: Arc<Shared>,
    writer: Mutex<Socket>,
    /// A descriptor of the socket to hang up on, and the reply thread.
    hangup: OwnedFd,
    reader: Option<JoinHandle<()>>,
}

fn connect(target: &Target) -> Result<OwnedFd, std::io::Error> {
    match target {
        Target::Unix(path) => Ok(UnixStream::connect(path)?.into()),
        Target::Tcp(host, port) => {
            let mut last = None;
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
                    Ok(s) => {
                        // Small requests (headers, flushes) must not wait for Nagle.
                        s.set_nodelay(true)?;
                        return Ok(s.into());
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
        }
    }
}

impl NbdClient {
    /// Connects to `uri` (an NBD URI) and negotiates its export.
    pub fn connect_uri(uri: &str, max_in_flight: usize) -> Result<NbdClient, ClientError> {
        NbdClient::connect(&NbdUri::parse(uri)?, max_in_flight)
    }

    pub fn connect(uri: &NbdUri, max_in_flight: usize) -> Result<NbdClient, ClientError> {
        NbdClient::connect_with(uri, max_in_flight, DEFAULT_REPLY_TIMEOUT)
    }

    /// `connect` with a reply timeout: a server that owes replies and sends nothing for
    /// that long loses the connection.
    pub fn connect_with(
        uri: &NbdUri,
        max_in_flight: usize,
        reply_timeout: Duration,
    ) -> Result<NbdClient, ClientError> {
        let fd = connect(&uri.target).map_err(|e| ClientError::Connect(uri.to_string(), e))?;
        let mut sock = Socket::new(fd);
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let info = negotiate(&mut sock, &uri.export)?;
        // The reply thread wakes this often to see whether a reply is overdue.
        let tick = (reply_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        sock.set_read_timeout(Some(tick))?;
        let reading = Socket::new(sock.try_clone()?);
        let hangup = sock.try_clone()?;
        let shared = Arc::new(Shared::new(max_in_flight, reply_timeout));
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || super::reader::run_socket(&s, reading, info))?;
        Ok(NbdClient {
            info,
            uri: uri.clone(),
            shared,
            writer: Mutex::new(sock),
            hangup,
            reader: Some(reader),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.state.lock().pending.len()
    }

    /// Checks `cmd` against what the export allows; its kind, offset, length and flags.
    fn frame(&self, cmd: &Command<'_>) -> Result<(u16, u64, u32, u16), ClientError> {
        let i = &self.info;
        let writable = !i.has(FLAG_READ_ONLY);
        let (kind, offset, len, flags) = match *cmd {
            Command::Read { offset, len } => (CMD_READ, offset, len, 0),
            Command::Write { offset, data, fua } => {
                let len =
                    u32::try_from(data.len()).map_err(|_| ClientError::Invalid("too long"))?;
                (CMD_WRITE, offset, len, if fua { CMD_FLAG_FUA } else { 0 })
            }
            Command::WriteZeroes { offset, len, fua } => {
                if !i.has(FLAG_SEND_WRITE_ZEROES) {
                    return Err(ClientError::Unsupported("WRITE_ZEROES"));
                }
                (
                    CMD_WRITE_ZEROES,
                    offset,
                    len,
                    if fua { CMD_FLAG_FUA } else { 0 },
                )
            }
            Command::Trim { offset, len } => {
                if !i.has(FLAG_SEND_TRIM) {
                    return Err(ClientError::Unsupported("TRIM"));
                }
                (CMD_TRIM, offset, len, 0)
            }
            Command::Flush => {
                if !i.has(FLAG_SEND_FLUSH) {
                    return Err(ClientError::Unsupported("FLUSH"));
                }
                return Ok((CMD_FLUSH, 0, 0, 0));
            }
        };
        if kind != CMD_READ && !writable {
            return Err(ClientError::Unsupported("writes (the export is read-only)"));
        }
        if flags & CMD_FLAG_FUA != 0 && !i.has(FLAG_SEND_FUA) {
            return Err(ClientError::Unsupported("FUA"));
        }
        if len == 0 {
            return Err(ClientError::Invalid("empty request"));
        }
        if (kind == CMD_READ || kind == CMD_WRITE) && len > i.max_payload {
            return Err(ClientError::Invalid(
                "longer than the server's maximum payload",
            ));
        }
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= i.size => {}
            _ => return Err(ClientError::Invalid("past the export's end")),
        }
        Ok((kind, offset, len, flags))
    }

    /// Sends `cmd`; `done` is called with its result once the reply came (or the connection
    /// ended). An `Err` here means the request was not taken and `done` will not be called.
    /// Waits while `max_in_flight` requests are in flight.
    pub fn submit(&self, cmd: Command<'_>, done: Done) -> Result<(), ClientError> {
        let (kind, offset, len, flags) = self.frame(&cmd)?;
        let cookie = self
            .shared
            .register(kind, offset, len, done)
            .map_err(ReplyError::Lost)?;
        let header = RequestHeader {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode();
        let payload: &[u8] = match cmd {
            Command::Write { data, .. } => data,
            _ => &[],
        };
        let sent = {
            let w = self.writer.lock();
            let mut iov = [
                libc::iovec {
                    iov_base: header.as_ptr().cast_mut().cast(),
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: payload.as_ptr().cast_mut().cast(),
                    iov_len: payload.len(),
                },
            ];
            // SAFETY: both iovecs name memory borrowed for this call (the header array and
            // the caller's payload), which the kernel only reads.
            unsafe { w.send_all(&mut iov) }
        };
        if let Err(e) = sent {
            // Half a request may be on the wire: the connection is unusable. If the reply
            // thread already failed this request, its `done` ran and the caller must not
            // see an error twice.
            Socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.hangup));
            let mine = self.shared.state.lock().pending.remove(&cookie);
            self.shared.fail_all(format!("sending a request: {e}"));
            if mine.is_some() {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Submits `cmd` and waits for its reply.
    pub fn call(&self, cmd: Command<'_>) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            cmd,
            Box::new(move |r| {
                // The receiver waits below; it cannot be gone.
                let _ = tx.send(r);
            }),
        )?;
        match rx.recv() {
            Ok(r) => Ok(r?),
            Err(_) => Err(ReplyError::Lost("request dropped".into()).into()),
        }
    }

    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.call(Command::Read { offset, len })
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.call(Command::Write {
            offset,
            data,
            fua: false,
        })
        .map(drop)
    }

    pub fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Command::WriteZeroes {
            offset,
            len,
            fua: false,
        })
        .map(drop)
    }

    pub fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Command::Trim { offset, len }).map(drop)
    }

    pub fn flush(&self) -> Result<(), ClientError> {
        self.call(Command::Flush).map(drop)
    }

    /// Something another thread can hang up this connection with (a job's cancel, while
    /// the copier waits for a server that stopped answering): every request in flight
    /// then fails with `ReplyError::Lost`.
    pub fn hang_up_handle(&self) -> std::io::Result<HangUp> {
        Ok(HangUp(self.hangup.try_clone()?))
    }

    /// Waits until no request is in flight and every `Done` has returned.
    pub fn drain(&self) {
        let mut st = self.shared.state.lock();
        while !st.pending.is_empty() || st.completing > 0 {
            self.shared.room.wait(&mut st);
        }
    }

    /// Ends the connection politely: waits for the replies in flight, then sends DISC
    /// (the server closes its end, which ends the reply thread).
    pub fn close(mut self) -> Result<(), ClientError> {
        self.drain();
        let header = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode();
        let failed = self.shared.state.lock().failed.clone();
        let r = match failed {
            Some(why) => Err(ReplyError::Lost(why).into()),
            None => {
                let mut w = self.writer.lock();
                crate::nbd::socket::Transport::write_all(&mut *w, &header).map_err(Into::into)
            }
        };
        // Shutting down our write side tells the server we are done even if it ignored
        // DISC; the reply thread then sees end of file.
        // SAFETY: shutdown on a socket descriptor this client owns.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.hangup), libc::SHUT_WR) };
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
        r
    }
}

/// A descriptor of a client's socket, to shut it down from elsewhere.
pub struct HangUp(OwnedFd);

impl HangUp {
    pub fn hang_up(&self) {
        Socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.0));
    }
}

impl Drop for NbdClient {
    /// Hangs up: requests still in flight fail with `ReplyError::Lost`.
    fn drop(&mut self) {
        if let Some(t) = self.reader.take() {
            Socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.hangup));
            let _ = t.join();
        }
    }
}
