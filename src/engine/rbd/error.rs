//! Errors of librados and librbd calls: the call's name and the errno it returned, inside an
//! `io::Error` of the matching kind (so callers that only care about the kind need nothing
//! more, and those that care about the errno, such as EROFS from another owner's lock or
//! ESHUTDOWN after a blocklisting, get it with [`errno`]).

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::raw::c_int;

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephError {
    pub call: &'static str,
    /// Positive.
    pub errno: i32,
}

impl fmt::Display for CephError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.call,
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for CephError {}

/// `call` failed with `errno` (positive).
pub fn ceph_error(call: &'static str, errno: i32) -> io::Error {
    let errno = errno.saturating_abs();
    io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        CephError { call, errno },
    )
}

/// The errno of a failed call (or of a plain OS error).
pub fn errno(e: &io::Error) -> Option<i32> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<CephError>())
        .map(|c| c.errno)
        .or_else(|| e.raw_os_error())
}

/// A negative return value is `-errno`.
pub(crate) fn check(call: &'static str, rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(ceph_error(call, -rc))
    } else {
        Ok(rc)
    }
}

/// As [`check`], for calls that return a byte count.
pub(crate) fn check_len(call: &'static str, rc: isize) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| ceph_error(call, i32::try_from(-rc).unwrap_or(libc::EIO)))
}

/// A name or path for C: NUL inside is an error, not a truncation.
pub(crate) fn c_string(what: &'static str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_keeps_its_name_kind_and_errno() {
        let e = check("rbd_open", -libc::ENOENT).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(errno(&e), Some(libc::ENOENT));
        assert!(e.to_string().starts_with("rbd_open: "), "{e}");
        assert_eq!(check("rbd_close", 0).unwrap(), 0);
        let e = check_len("rbd_read2", -(libc::ESHUTDOWN as isize)).unwrap_err();
        assert_eq!(errno(&e), Some(libc::ESHUTDOWN));
        assert_eq!(check_len("rbd_read2", 4096).unwrap(), 4096);
        assert_eq!(
            errno(&io::Error::from_raw_os_error(libc::EROFS)),
            Some(libc::EROFS)
        );
    }
}
