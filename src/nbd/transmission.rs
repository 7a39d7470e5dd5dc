//! The transmission phase of one connection: one thread reads requests, submits them to the
//! export's device queue (the same asynchronous seam vhost uses, `BlockDevice::open_queue`)
//! and writes each reply when its completion comes, so many requests are in flight and
//! replies go out in completion order.
//!
//! The thread sleeps in poll(2) on the socket and the queue's eventfd. It stops reading while
//! [`MAX_IN_FLIGHT`] requests or [`MAX_BYTES_IN_FLIGHT`] bytes of buffers are outstanding, so
//! a client cannot make it hold more. Whatever ends the connection (NBD_CMD_DISC, the client
//! hanging up mid-request, a protocol violation, a failed reply), every submitted request
//! completes before its buffer is freed and the socket closes.

use std::io;
use std::os::fd::RawFd;

use super::buffer::DataBuf;
use super::meta::{self, Context};
use super::negotiate::Session;
use super::proto::*;
use super::reply;
use super::request::{check, Command, Limits, Request, Verdict};
use super::socket::Socket;
use crate::engine::io::{ByteRange, Completion, IoOp, IoRequest};
use crate::engine::iov::RawBufs;
use crate::engine::{BlockError, IoQueue, QueueOptions};

/// Requests in flight per connection at most.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of read and write buffers per connection at most (a request is taken while less is
/// outstanding, so the real bound is this plus one request's maximum payload).
pub const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;

enum Reading {
    Header {
        buf: [u8; REQUEST_LEN],
        got: usize,
    },
    Payload {
        req: Request,
        buf: DataBuf,
        got: usize,
    },
    /// The payload of a refused write, read and dropped.
    Skip {
        left: u32,
    },
}

struct InFlight {
    req: Request,
    /// Kept, untouched, until the request completes: the device uses it meanwhile.
    buf: Option<DataBuf>,
}

pub struct Connection {
    sock: Socket,
    session: Session,
    limits: Limits,
    queue: Box<dyn IoQueue>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    bytes_in_flight: usize,
    reading: Reading,
    /// Read no more: the client sent NBD_CMD_DISC or hung up.
    closing: bool,
    done: Vec<Completion>,
}

/// The NBD error for a device error.
pub fn nbd_error(e: &BlockError) -> u32 {
    match e {
        BlockError::OutOfRange { .. } | BlockError::Unsupported(_) => EINVAL,
        BlockError::ReadOnly => EPERM,
        BlockError::NoSpace => ENOSPC,
        _ => EIO,
    }
}

fn header() -> Reading {
    Reading::Header {
        buf: [0; REQUEST_LEN],
        got: 0,
    }
}

impl Connection {
    pub fn new(sock: Socket, session: Session) -> io::Result<Self> {
        let opts = QueueOptions {
            entries: MAX_IN_FLIGHT as u32,
            submit_batch: 4,
        };
        let queue = session.export.dev.clone().open_queue(&opts)?;
        let limits = Limits {
            size: session.export.size(),
            writable: session.export.writable,
            structured: session.structured,
            has_contexts: !session.contexts.is_empty(),
            fast_zero: session.export.fast_zero,
        };
        Ok(Connection {
            sock,
            session,
            limits,
            queue,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            bytes_in_flight: 0,
            reading: header(),
            closing: false,
            done: Vec::new(),
        })
    }

    /// Serves the connection until it ends; every request is finished when this returns.
    pub fn run(mut self) -> io::Result<()> {
        let result = self.serve();
        // However it ended, the device may still be using buffers: let it finish.
        self.queue.drain();
        self.queue.reap(&mut |_| {});
        result
    }

    fn can_read(&self) -> bool {
        !self.closing && !self.free.is_empty() && self.bytes_in_flight < MAX_BYTES_IN_FLIGHT
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            self.queue.submit_pending();
            self.reap()?;
            if self.closing && self.free.len() == MAX_IN_FLIGHT {
                return Ok(());
            }
            if self.queue.has_completions() {
                continue;
            }
            let want_read = self.can_read();
            let mut fds = [
                libc::pollfd {
                    fd: self.sock.fd(),
                    events: if want_read { libc::POLLIN } else { 0 },
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.queue.notifier(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds that live across the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let ev = fds[0].revents;
            if want_read && ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.read_some()?;
            } else if ev & (libc::POLLHUP | libc::POLLERR) != 0 {
                // Gone while we were not reading: finish what is in flight, then close.
                self.closing = true;
            }
        }
    }

    /// Reads what the socket has, as long as more requests may be taken.
    fn read_some(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 16 << 10];
        while self.can_read() {
            let n = match &mut self.reading {
                Reading::Header { buf, got } => {
                    let rest = &mut buf[*got..];
                    // SAFETY: our own buffer, valid for its length.
                    unsafe { self.sock.recv_now(rest.as_mut_ptr(), rest.len()) }
                }
                Reading::Payload { buf, got, .. } => {
                    // SAFETY: the buffer is ours, not yet submitted, `got` < its length.
                    unsafe {
                        self.sock
                            .recv_now(buf.ptr().wrapping_add(*got), buf.len() - *got)
                    }
                }
                Reading::Skip { left } => {
                    let n = scratch.len().min(*left as usize);
                    // SAFETY: our own buffer, at least `n` long.
                    unsafe { self.sock.recv_now(scratch.as_mut_ptr(), n) }
                }
            };
            let n = match n {
                Ok(0) => {
                    // The client hung up, perhaps in the middle of a request.
                    self.closing = true;
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            self.advance(n)?;
        }
        Ok(())
    }

    /// Takes `n` more bytes of what was being read.
    fn advance(&mut self, n: usize) -> io::Result<()> {
        match &mut self.reading {
            Reading::Header { buf, got } => {
                *got += n;
                if *got == REQUEST_LEN {
                    let h = RequestHeader::decode(buf);
                    self.reading = header();
                    self.take(&h)?;
                }
            }
            Reading::Payload { got, buf, .. } => {
                *got += n;
                if *got == buf.len() {
                    if let Reading::Payload { req, buf, .. } =
                        std::mem::replace(&mut self.reading, header())
                    {
                        self.submit(req, IoOp::Write, Some(buf));
                    }
                }
            }
            Reading::Skip { left } => {
                *left -= n as u32;
                if *left == 0 {
                    self.reading = header();
                }
            }
        }
        Ok(())
    }

    /// Acts on one request header.
    fn take(&mut self, h: &RequestHeader) -> io::Result<()> {
        let req = match check(h, &self.limits) {
            Verdict::Close(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
            Verdict::Refuse {
                cookie,
                error,
                skip,
            } => {
                if skip > 0 {
                    self.reading = Reading::Skip { left: skip };
                }
                return self.send(&reply::error(
                    self.session.structured,
                    cookie,
                    error,
                    "request refused",
                ));
            }
            Verdict::Run(req) => req,
        };
        let len = req.len as usize;
        match req.cmd {
            Command::Disconnect => {
                self.closing = true;
                Ok(())
            }
            Command::Read | Command::Write if len == 0 => self.send_read_done(&req),
            Command::Trim | Command::WriteZeroes if len == 0 => self.send(&reply::ok(req.cookie)),
            Command::Read | Command::Write => {
                let Some(buf) = DataBuf::new(len) else {
                    if req.cmd == Command::Write {
                        self.reading = Reading::Skip { left: req.len };
                    }
                    let r = reply::error(self.session.structured, req.cookie, EIO, "no memory");
                    return self.send(&r);
                };
                if req.cmd == Command::Read {
                    self.submit(req, IoOp::Read, Some(buf));
                } else {
                    self.reading = Reading::Payload { req, buf, got: 0 };
                }
                Ok(())
            }
            Command::Flush => {
                self.submit(req, IoOp::Flush, None);
                Ok(())
            }
            Command::Trim | Command::WriteZeroes => {
                let range = vec![ByteRange {
                    offset: req.offset,
                    len: u64::from(req.len),
                    may_unmap: req.cmd == Command::Trim || req.may_unmap,
                }];
                let op = if req.cmd == Command::Trim {
                    IoOp::Discard(range.into())
                } else {
                    IoOp::WriteZeroes(range.into())
                };
                self.submit(req, op, None);
                Ok(())
            }
            // A hint: reads go to the host's cache or device either way.
            Command::Cache => self.send(&reply::ok(req.cookie)),
            Command::BlockStatus => self.block_status(&req),
        }
    }

    /// The reply to a read of nothing (or a write of nothing).
    fn send_read_done(&mut self, req: &Request) -> io::Result<()> {
        if self.session.structured && req.cmd == Command::Read {
            self.send(&reply::none(req.cookie))
        } else {
            self.send(&reply::ok(req.cookie))
        }
    }

    fn block_status(&mut self, req: &Request) -> io::Result<()> {
        let mut out = Vec::new();
        let contexts: Vec<Context> = self.session.contexts.clone();
        for (i, c) in contexts.iter().enumerate() {
            let descs = meta::block_status(
                &self.session.export,
                *c,
                req.offset,
                u64::from(req.len),
                req.req_one,
            );
            match descs {
                Ok(d) => {
                    let last = i + 1 == contexts.len();
                    reply::block_status(&mut out, req.cookie, meta::context_id(*c), &d, last);
                }
                Err(e) => {
                    return self.send(&reply::error_chunk(
                        req.cookie,
                        nbd_error(&e),
                        &e.to_string(),
                    ))
                }
            }
        }
        self.send(&out)
    }

    fn submit(&mut self, req: Request, op: IoOp, buf: Option<DataBuf>) {
        let Some(slot) = self.free.pop() else {
            // `can_read` keeps a slot free for every request it lets in.
            return;
        };
        let bufs = match &buf {
            // SAFETY: the buffer stays in its slot, untouched and reached by no reference,
            // until the request completes (`run` drains the queue before anything drops).
            Some(b) => unsafe { RawBufs::new([(b.ptr(), b.len())], None) },
            None => RawBufs::default(),
        };
        self.bytes_in_flight += buf.as_ref().map_or(0, |b| b.len());
        let durable = req.fua;
        self.slots[slot] = Some(InFlight { req, buf });
        self.queue.submit(IoRequest {
            op,
            offset: req.offset,
            bufs,
            durable,
            tag: slot as u64,
        });
    }

    fn reap(&mut self) -> io::Result<()> {
        let mut done = std::mem::take(&mut self.done);
        // Reset before reaping: what completes after the reset wakes poll again.
        self.queue.acknowledge();
        self.queue.reap(&mut |c| done.push(c));
        let mut result = Ok(());
        for c in done.drain(..) {
            if result.is_ok() {
                result = self.complete(c);
            } else {
                self.release(c.tag);
            }
        }
        self.done = done;
        result
    }

    fn release(&mut self, tag: u64) -> Option<InFlight> {
        let slot = usize::try_from(tag).ok()?;
        let f = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.bytes_in_flight -= f.buf.as_ref().map_or(0, |b| b.len());
        Some(f)
    }

    fn complete(&mut self, c: Completion) -> io::Result<()> {
        let Some(f) = self.release(c.tag) else {
            return Ok(());
        };
        let cookie = f.req.cookie;
        if let Err(e) = &c.result {
            let r = reply::error(
                self.session.structured,
                cookie,
                nbd_error(e),
                &e.to_string(),
            );
            return self.send(&r);
        }
        match (f.req.cmd, &f.buf) {
            (Command::Read, Some(buf)) => {
                let head = if self.session.structured {
                    reply::read_data_header(cookie, f.req.offset, f.req.len)
                } else {
                    reply::simple(cookie, 0).to_vec()
                };
                let mut iov = [
                    libc::iovec {
                        iov_base: head.as_ptr().cast_mut().cast(),
                        iov_len: head.len(),
                    },
                    libc::iovec {
                        iov_base: buf.ptr().cast(),
                        iov_len: buf.len(),
                    },
                ];
                // SAFETY: `head` and the completed read's buffer live across the call.
                unsafe { self.sock.send_all(&mut iov) }
            }
            _ => self.send(&reply::ok(cookie)),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        use super::socket::Transport;
        self.sock.write_all(bytes)
    }

    pub fn socket_fd(&self) -> RawFd {
        self.sock.fd()
    }
}
