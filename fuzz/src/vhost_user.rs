//! The vhost-user message stream as a hostile frontend sends it: headers (any request code,
//! flags and size, true or not), payloads, and file descriptors (memfds of chosen sizes,
//! eventfds, pipe ends, socket ends, /dev/null) attached with SCM_RIGHTS, fed over a real
//! socket to a `VhostUserDaemon` serving a `BlkBackend` on a memory disk, exactly as
//! `vhost::export` serves a frontend. Kicks on eventfds it handed over make the queue workers
//! run whatever rings and requests the frontend wrote into its memfds.
//!
//! Unlike the other targets this one has threads and a socket (the daemon's request thread and
//! one worker per queue; an abstract-namespace socket, no file): the message handling under
//! test is written for them. A panic on any thread aborts the process (libFuzzer's panic hook),
//! a hang is caught by libFuzzer's timeout. The session must always end: once the input is
//! spent the frontend hangs up, and the daemon's session and workers must finish.
//!
//! Input: a byte of device flags (bit 0: read-only), then operations until the input ends, each
//! led by an op byte whose low 3 bits choose:
//! - 0 to 5, a message: request code byte (mod 48), a flags byte `f`, payload length (u16;
//!   mod 320, or mod 4200 if `f` bit 6), the payload, the header's size field (u32) if `f` bit 5
//!   (else the true length), the header's flags (u32) if `f` bit 7 (else version 1, with
//!   NEED_REPLY if `f` bit 3), a count byte (mod 9) and one kind byte per descriptor
//!   ([`FdKind::from_byte`]);
//! - 6, a kick: an index byte choosing one of the eventfds sent so far, written once;
//! - 7, a write into guest memory: an index byte choosing a memfd sent so far, an offset
//!   (u32, mod 2 MiB), a length byte and that many bytes.
//!
//! `encode` writes such an input from [`Op`]s; `examples/make_seeds.rs` uses it for the seeds.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use thinblk::engine::memory::MemoryDevice;
use thinblk::vhost::{BlkBackend, DeviceSettings};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::Input;

/// Queues of the device under test, and their size.
const QUEUES: u16 = 2;
const QUEUE_SIZE: u16 = 16;
const DISK: u64 = 64 << 10;
/// vhost-user header flags: protocol version 1, and "reply to this".
const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
/// Sizes a memfd may have: none, smaller than a page, a page, and larger.
const MEMFD_SIZES: [u64; 4] = [0, 100, 4096, 1 << 20];

/// A file descriptor a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A memfd of `MEMFD_SIZES[n]` bytes (its contents can be written later).
    Memfd(u8),
    EventFd,
    PipeRead,
    PipeWrite,
    Socket,
    DevNull,
}

impl FdKind {
    /// Kind byte: low 3 bits the kind (mod 6), bits 3-4 a memfd's size.
    pub fn from_byte(b: u8) -> FdKind {
        match (b & 7) % 6 {
            0 => FdKind::Memfd((b >> 3) & 3),
            1 => FdKind::EventFd,
            2 => FdKind::PipeRead,
            3 => FdKind::PipeWrite,
            4 => FdKind::Socket,
            _ => FdKind::DevNull,
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            FdKind::Memfd(n) => (n & 3) << 3,
            FdKind::EventFd => 1,
            FdKind::PipeRead => 2,
            FdKind::PipeWrite => 3,
            FdKind::Socket => 4,
            FdKind::DevNull => 5,
        }
    }
}

/// One step of a session, for writing seeds.
#[derive(Clone, Debug)]
pub enum Op {
    Message {
        code: u8,
        need_reply: bool,
        payload: Vec<u8>,
        fds: Vec<FdKind>,
    },
    /// Writes 1 into the `n`th eventfd sent so far.
    Kick(u8),
    /// Writes `bytes` at `offset` of the `n`th memfd sent so far.
    Fill {
        memfd: u8,
        offset: u32,
        bytes: Vec<u8>,
    },
}

/// The fuzz input that plays `ops` on a device with `flags`.
pub fn encode(flags: u8, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![flags];
    for op in ops {
        match op {
            Op::Message {
                code,
                need_reply,
                payload,
                fds,
            } => {
                let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
                let mut f = if *need_reply { 0x08 } else { 0 };
                if len >= 320 {
                    f |= 0x40;
                }
                out.extend([0, *code, f]);
                out.extend(len.to_le_bytes());
                out.extend(payload);
                out.push(u8::try_from(fds.len()).unwrap_or(8));
                out.extend(fds.iter().map(|k| k.to_byte()));
            }
            Op::Kick(n) => out.extend([6, *n]),
            Op::Fill {
                memfd,
                offset,
                bytes,
            } => {
                out.extend([7, *memfd]);
                out.extend(offset.to_le_bytes());
                out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
                out.extend(bytes);
            }
        }
    }
    out
}

/// The frontend's ends of what it sent, kept open for the whole session.
#[derive(Default)]
struct Sent {
    memfds: Vec<File>,
    eventfds: Vec<EventFd>,
    /// Every other descriptor: pipe and socket ends, /dev/null.
    others: Vec<OwnedFd>,
}

fn memfd(size: u64) -> Option<File> {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).ok()?;
    Some(file)
}

fn pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    // SAFETY: both are new descriptors that nothing else owns.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Sent {
    /// Makes a descriptor of `kind`, keeps the frontend's side, returns the one to send.
    fn make(&mut self, kind: FdKind) -> Option<RawFd> {
        Some(match kind {
            FdKind::Memfd(n) => {
                let f = memfd(MEMFD_SIZES[usize::from(n & 3)])?;
                let fd = f.as_raw_fd();
                self.memfds.push(f);
                fd
            }
            FdKind::EventFd => {
                let e = EventFd::new(libc::EFD_NONBLOCK).ok()?;
                let fd = e.as_raw_fd();
                self.eventfds.push(e);
                fd
            }
            FdKind::PipeRead | FdKind::PipeWrite => {
                let (r, w) = pipe()?;
                let fd = if kind == FdKind::PipeRead {
                    r.as_raw_fd()
                } else {
                    w.as_raw_fd()
                };
                self.others.extend([r, w]);
                fd
            }
            FdKind::Socket => {
                let (a, b) = UnixStream::pair().ok()?;
                let fd = a.as_raw_fd();
                self.others.extend([OwnedFd::from(a), OwnedFd::from(b)]);
                fd
            }
            FdKind::DevNull => {
                let f = File::open("/dev/null").ok()?;
                let fd = f.as_raw_fd();
                self.others.push(OwnedFd::from(f));
                fd
            }
        })
    }
}

/// Reads one message's worth of input and sends it.
fn send_message(input: &mut Input<'_>, sock: &UnixStream, sent: &mut Sent) {
    let code = u32::from(input.u8() % 48);
    let f = input.u8();
    let modulus: u16 = if f & 0x40 != 0 { 4200 } else { 320 };
    let len = input.u16() % modulus;
    let mut payload: Vec<u8> = input
        .rest()
        .iter()
        .copied()
        .take(usize::from(len))
        .collect();
    input.0 = input.0.get(payload.len()..).unwrap_or(&[]);
    payload.resize(usize::from(len), 0);
    let size = if f & 0x20 != 0 {
        input.u32()
    } else {
        u32::from(len)
    };
    let flags = if f & 0x80 != 0 {
        input.u32()
    } else if f & 0x08 != 0 {
        VERSION_1 | NEED_REPLY
    } else {
        VERSION_1
    };
    let count = input.u8() % 9;
    let fds: Vec<RawFd> = (0..count)
        .filter_map(|_| sent.make(FdKind::from_byte(input.u8())))
        .collect();
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend(code.to_le_bytes());
    msg.extend(flags.to_le_bytes());
    msg.extend(size.to_le_bytes());
    msg.extend(&payload);
    // The descriptors ride on the first byte, as a frontend sends them with the header. A
    // daemon that hung up makes this fail; the session is over then.
    let _ = sock.send_with_fds(&[&msg[..]], &fds);
}

/// Kicks in a session after which the frontend waits a little for the device to answer, so
/// that what follows (a ring stopped, a memory table replaced) meets requests the worker has
/// taken rather than only racing it. Bounded, so inputs full of kicks stay fast.
const WAITED_KICKS: usize = 4;
const CALL_WAIT_MS: i32 = 2;

/// Waits up to `CALL_WAIT_MS` for any eventfd but the one kicked (a call fd, if the frontend
/// made one) to be signalled.
fn wait_for_a_call(eventfds: &[EventFd], kicked: usize) {
    let mut polls: Vec<libc::pollfd> = eventfds
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != kicked)
        .map(|(_, e)| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    if polls.is_empty() {
        return;
    }
    // SAFETY: `polls` is a valid array of pollfd of the length given, alive for the call.
    unsafe {
        libc::poll(
            polls.as_mut_ptr(),
            polls.len() as libc::nfds_t,
            CALL_WAIT_MS,
        )
    };
}

/// The daemon's side of one frontend connection, with every check an export makes.
struct Session {
    thread: std::thread::JoinHandle<()>,
}

impl Session {
    fn start(backend: &Arc<BlkBackend>) -> (UnixStream, Session) {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let backend = backend.clone();
        let thread = std::thread::Builder::new()
            .name("fz-session".into())
            .spawn(move || {
                let _ = thinblk::vhost::connection::serve_stream(theirs, &backend);
            })
            .expect("the session thread");
        (ours, Session { thread })
    }

    fn end(self, _backend: &BlkBackend) {
        self.thread.join().expect("the session thread");
    }
}

pub fn run(data: &[u8]) {
    let unit = super::stall_report::Unit::begin();
    let mut input = Input(data);
    let device_flags = input.u8();
    let dev = Arc::new(MemoryDevice::new(DISK).expect("memory disk"));
    let backend = Arc::new(BlkBackend::new(
        dev,
        DeviceSettings {
            serial: "fuzz".into(),
            num_queues: QUEUES,
            queue_size: QUEUE_SIZE,
            read_only: device_flags & 1 != 0,
            poll: std::time::Duration::ZERO,
            submit_batch: 4,
        },
    ));
    let (sock, session) = Session::start(&backend);

    // Replies are read and dropped as they come, so the daemon never blocks on a full socket.
    let mut replies = sock.try_clone().expect("clone the frontend socket");
    let reader = std::thread::Builder::new()
        .name("fz-replies".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(replies.read(&mut buf), Ok(n) if n > 0) {}
        })
        .expect("the reply reader");

    let mut sent = Sent::default();
    let mut kicks = 0;
    let mut step = 0;
    while !input.rest().is_empty() {
        let op = input.u8() & 7;
        // Kinds 0-5 are messages: the report names the request code, read next.
        let kind = match op {
            0..=5 => 100 + u32::from(input.rest().first().copied().unwrap_or(0) % 48),
            _ => u32::from(op),
        };
        unit.step(step, kind);
        step += 1;
        match op {
            6 => {
                let n = usize::from(input.u8());
                if !sent.eventfds.is_empty() {
                    let kicked = n % sent.eventfds.len();
                    let _ = sent.eventfds[kicked].write(1);
                    if kicks < WAITED_KICKS {
                        kicks += 1;
                        wait_for_a_call(&sent.eventfds, kicked);
                    }
                }
            }
            7 => {
                let n = usize::from(input.u8());
                let offset = u64::from(input.u32()) % (2 << 20);
                let len = usize::from(input.u8());
                let bytes: Vec<u8> = input.rest().iter().copied().take(len).collect();
                input.0 = input.0.get(bytes.len()..).unwrap_or(&[]);
                if !sent.memfds.is_empty() {
                    let f = &sent.memfds[n % sent.memfds.len()];
                    // Past the end of a small memfd this grows it: fine, the daemon mapped
                    // what the frontend declared.
                    let _ = f.write_at(&bytes, offset);
                }
            }
            _ => send_message(&mut input, &sock, &mut sent),
        }
    }

    // The frontend hangs up; the session and every worker must end.
    unit.step(step, 999);
    let _ = sock.shutdown(std::net::Shutdown::Write);
    session.end(&backend);
    let _ = sock.shutdown(std::net::Shutdown::Both);
    reader.join().expect("reply reader");
    drop(sent);
}
