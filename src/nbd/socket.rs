//! A connected client socket (unix or TCP) as an owned descriptor, with the few calls the
//! server makes on it: blocking reads and writes for the handshake, non-blocking reads and
//! gathered writes for transmission. Writes use MSG_NOSIGNAL: a client that went away is an
//! error on its own connection, never a SIGPIPE for the daemon.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// What the handshake reads from and writes to (a socket, or bytes in a test or fuzz run).
pub trait Transport {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()>;
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
}

pub struct Socket(OwnedFd);

fn check(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl Socket {
    pub fn new(fd: OwnedFd) -> Self {
        Socket(fd)
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// A second descriptor of the same socket (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// Bounds how long one blocking read waits (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = t.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |t| libc::timeval {
                tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_usec: libc::suseconds_t::from(t.subsec_micros().min(999_999) as i32),
            },
        );
        // SAFETY: a valid socket descriptor and a timeval that lives across the call.
        let r = unsafe {
            libc::setsockopt(
                self.fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads what is there, without waiting, into `len` bytes at `ptr`. `Ok(0)`: the client
    /// closed its end; `WouldBlock`: nothing to read now.
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes and reached by no Rust reference.
    pub unsafe fn recv_now(&self, ptr: *mut u8, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: the caller's contract on `ptr` and `len`.
            let n = unsafe { libc::recv(self.fd(), ptr.cast(), len, libc::MSG_DONTWAIT) };
            match check(n) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Writes every byte of `iov`, in order, waiting as long as the client takes.
    ///
    /// # Safety
    /// Every iovec must be valid for reads for the duration of the call.
    pub unsafe fn send_all(&self, iov: &mut [libc::iovec]) -> io::Result<()> {
        let mut first = 0;
        while first < iov.len() {
            let rest = &mut iov[first..];
            // SAFETY: a zeroed msghdr is a valid empty one; it names only `rest`, which the
            // caller guarantees readable.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = rest.as_mut_ptr();
                msg.msg_iovlen = rest.len().min(libc::UIO_MAXIOV as usize) as _;
                libc::sendmsg(self.fd(), &msg, libc::MSG_NOSIGNAL)
            };
            let mut n = match check(n) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
            };
            while first < iov.len() && n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            }
            if n > 0 {
                let v = &mut iov[first];
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
            }
        }
        Ok(())
    }

    /// Ends both directions: a thread blocked on this socket wakes with an error or EOF.
    pub fn shutdown(fd: RawFd) {
        // SAFETY: shutdown takes any descriptor; on one that is not a socket it fails.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

impl Transport for Socket {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let rest = &mut buf[at..];
            // SAFETY: `rest` is our own buffer, valid for writes of its length.
            let n = unsafe { libc::recv(self.fd(), rest.as_mut_ptr().cast(), rest.len(), 0) };
            match check(n) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => at += n,
            }
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` is readable for the call.
        unsafe { self.send_all(&mut iov) }
    }
}
