//! A vhost-user frontend that writes the wire format by hand, so it can send what no VMM would:
//! any request code, header flags and sizes that disagree with the payload, any number and kind
//! of fds, in any order, and hang up anywhere.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const RESET_OWNER: u32 = 4;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SET_BACKEND_REQ_FD: u32 = 21;
pub const GET_CONFIG: u32 = 24;
pub const SET_CONFIG: u32 = 25;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
/// The last request code vhost 0.18 knows (GET_SHMEM_CONFIG).
pub const LAST_CODE: u32 = 44;

pub const VERSION: u32 = 1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;

/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const P_MQ: u64 = 1 << 0;
pub const P_LOG_SHMFD: u64 = 1 << 1;
pub const P_REPLY_ACK: u64 = 1 << 3;
pub const P_BACKEND_REQ: u64 = 1 << 5;
pub const P_CONFIG: u64 = 1 << 9;
pub const P_INFLIGHT_SHMFD: u64 = 1 << 12;
/// Not offered by thinblk (host notifiers need a device with doorbells in a BAR).
pub const P_HOST_NOTIFIER: u64 = 1 << 11;
pub const P_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
/// Bit 8 of a SET_VRING_KICK/CALL/ERR payload: no fd comes with it.
pub const NO_FD: u64 = 0x100;

/// How long the daemon may take to answer or to hang up.
const PATIENCE: Duration = Duration::from_secs(10);

pub struct Wire {
    sock: UnixStream,
}

/// A reply: its header fields and payload.
#[derive(Debug)]
pub struct Reply {
    pub code: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn u64(&self) -> u64 {
        assert_eq!(self.payload.len(), 8, "reply payload of {self:?}");
        u64::from_le_bytes(self.payload[..8].try_into().unwrap())
    }
}

pub fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&code.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

pub fn u64_payload(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [desc, used, avail, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// One region as SET_MEM_TABLE and ADD_MEM_REG carry it.
#[derive(Clone, Copy, Debug)]
pub struct RegionMsg {
    pub guest: u64,
    pub size: u64,
    pub user: u64,
    pub offset: u64,
}

impl RegionMsg {
    fn bytes(&self) -> Vec<u8> {
        [self.guest, self.size, self.user, self.offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }
}

pub fn mem_table(regions: &[RegionMsg]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        p.extend(r.bytes());
    }
    p
}

pub fn single_region(r: &RegionMsg) -> Vec<u8> {
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend(r.bytes());
    p
}

impl Wire {
    pub fn connect(socket: &Path) -> Wire {
        let sock = UnixStream::connect(socket).expect("connect to the export");
        sock.set_read_timeout(Some(PATIENCE)).unwrap();
        sock.set_write_timeout(Some(PATIENCE)).unwrap();
        Wire { sock }
    }

    /// Writes `bytes` with `fds` attached (SCM_RIGHTS) in one sendmsg.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.is_empty() {
            return self.sock.write_all(bytes);
        }
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer in it points at live buffers above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and `fds` (CMSG_SPACE above).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
        // SAFETY: sendmsg reads the buffers msg points at, all alive for the call.
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if (n as usize) < bytes.len() {
            self.sock.write_all(&bytes[n as usize..])?;
        }
        Ok(())
    }

    /// Sends a request whose header says exactly what follows.
    pub fn send(&mut self, code: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut m = header(code, VERSION | flags, payload.len() as u32);
        m.extend_from_slice(payload);
        self.send_bytes(&m, fds)
    }

    /// Reads one reply; an error if the daemon hung up or said nothing in time.
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut h = [0u8; 12];
        self.sock.read_exact(&mut h)?;
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        self.sock.read_exact(&mut payload)?;
        Ok(Reply {
            code: word(0),
            flags: word(4),
            payload,
        })
    }

    /// A request that has a reply of its own (GET_*).
    pub fn get(&mut self, code: u32, payload: &[u8]) -> Reply {
        self.send(code, 0, payload, &[]).expect("send");
        let r = self
            .recv()
            .unwrap_or_else(|e| panic!("no reply to {code}: {e}"));
        assert_eq!(r.code, code);
        assert_eq!(r.flags & REPLY, REPLY);
        r
    }

    /// A request with NEED_REPLY: the ack's value (0 = done), or `None` if the daemon hung up
    /// without one.
    pub fn ack(&mut self, code: u32, payload: &[u8], fds: &[RawFd]) -> Option<u64> {
        if self.send(code, NEED_REPLY, payload, fds).is_err() {
            return None;
        }
        let r = self.recv().ok()?;
        assert_eq!(r.code, code, "ack for another request: {r:?}");
        Some(r.u64())
    }

    /// Asserts the request is done (acked with 0).
    pub fn ok(&mut self, code: u32, payload: &[u8], fds: &[RawFd]) {
        assert_eq!(
            self.ack(code, payload, fds),
            Some(0),
            "request {code} refused"
        );
    }

    /// Asserts the request is refused: a negative ack, then the connection closes.
    pub fn refused(&mut self, code: u32, payload: &[u8], fds: &[RawFd]) {
        let ack = self.ack(code, payload, fds);
        assert!(
            matches!(ack, Some(v) if v != 0),
            "request {code} was not refused with an error reply: {ack:?}"
        );
        assert!(self.hung_up(), "the connection stays open after a refusal");
    }

    /// Whether the daemon refuses what was just sent: it hangs up, or replies with an error
    /// (a non-zero u64) and hangs up or waits for the next request.
    pub fn refuses(&mut self) -> bool {
        self.sock
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let verdict = match self.recv() {
            Err(_) => true,
            Ok(r) => r.payload.len() == 8 && r.u64() != 0,
        };
        self.sock.set_read_timeout(Some(PATIENCE)).unwrap();
        verdict
    }

    /// Whether the daemon closes the connection (within the patience limit).
    pub fn hung_up(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                // Only running out of patience means the connection is still open.
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }

    /// GET_FEATURES, SET_FEATURES (all offered but EVENT_IDX), the protocol features thinblk offers that
    /// QEMU uses (without BACKEND_REQ), SET_OWNER: REPLY_ACK is on from here.
    pub fn negotiate(&mut self) {
        let features = self.get(GET_FEATURES, &[]).u64();
        assert_ne!(features & F_PROTOCOL_FEATURES, 0);
        // Without EVENT_IDX every completion notifies, and the driver need not keep
        // used_event up to date.
        let features = features & !F_EVENT_IDX;
        self.send(SET_FEATURES, 0, &u64_payload(features), &[])
            .unwrap();
        let offered = self.get(GET_PROTOCOL_FEATURES, &[]).u64();
        let wanted = P_MQ | P_REPLY_ACK | P_CONFIG | P_CONFIGURE_MEM_SLOTS;
        assert_eq!(offered & wanted, wanted);
        self.send(SET_PROTOCOL_FEATURES, 0, &u64_payload(wanted), &[])
            .unwrap();
        self.ok(SET_OWNER, &[], &[]);
    }
}
