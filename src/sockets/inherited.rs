//! Listening sockets handed over by the process this one replaced (`daemon/upgrade.rs`): their
//! fds stay open across exec, named with their paths in [`ENV`], so a socket path never stops
//! accepting and frontends queued on it meanwhile are served by this process.
//!
//! [`adopt`] must run before the process opens anything (so an fd number in the variable is
//! still the inherited socket); each fd is checked to be a listening unix socket before it is
//! owned. [`bind_private`](super::bind_private) takes the one for its path instead of binding;
//! [`close_unclaimed`] closes the rest once every export and the control socket started.

use std::ffi::OsStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use log::{info, warn};
use parking_lot::Mutex;

/// `FD:PATH` entries, one a line.
pub const ENV: &str = "THINBLK_LISTEN_FDS";

static INHERITED: Mutex<Vec<(PathBuf, UnixListener)>> = Mutex::new(Vec::new());

/// `entries` as the value of [`ENV`]; a path holding a newline cannot be named (and is left
/// out: its export then binds a new socket).
pub fn encode(entries: &[(RawFd, &Path)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (fd, path) in entries {
        let bytes = path.as_os_str().as_bytes();
        if bytes.contains(&b'\n') {
            warn!(
                "{}: cannot hand the socket over (newline in its path)",
                path.display()
            );
            continue;
        }
        out.extend_from_slice(format!("{fd}:").as_bytes());
        out.extend_from_slice(bytes);
        out.push(b'\n');
    }
    out
}

/// The `(fd, path)` entries of a value of [`ENV`]; malformed lines are skipped.
pub fn decode(value: &[u8]) -> Vec<(RawFd, PathBuf)> {
    value
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let fd = std::str::from_utf8(line.get(..colon)?).ok()?.parse().ok()?;
            let path = line.get(colon + 1..).filter(|p| !p.is_empty())?;
            Some((fd, PathBuf::from(OsStr::from_bytes(path))))
        })
        .collect()
}

/// Whether `fd` is an open, listening unix stream socket.
fn is_listening_unix_socket(fd: RawFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let mut sockopt = |opt| {
        // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own; a bad fd
        // only makes it fail.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    sockopt(libc::SO_ACCEPTCONN) == Some(1)
        && sockopt(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sockopt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Takes ownership of the sockets named in [`ENV`], once, at startup.
pub fn adopt() {
    let Some(value) = std::env::var_os(ENV) else {
        return;
    };
    let mut table = INHERITED.lock();
    for (fd, path) in decode(value.as_bytes()) {
        if fd < 3 || !is_listening_unix_socket(fd) || table.iter().any(|(p, _)| *p == path) {
            warn!(
                "{ENV}: fd {fd} for {} is not a listening unix socket; ignored",
                path.display()
            );
            continue;
        }
        // SAFETY: fd is open (getsockopt succeeded on it), it was inherited for this purpose
        // and nothing else in this process owns it yet (adopt runs before anything opens).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not into the next exec: an upgrade passes fresh duplicates.
        // SAFETY: F_SETFD on the fd we own now.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        info!("{}: listening socket inherited (fd {fd})", path.display());
        table.push((path, UnixListener::from(owned)));
    }
}

/// The inherited listening socket for `path`, if there is one.
pub fn take(path: &Path) -> Option<UnixListener> {
    let mut table = INHERITED.lock();
    let i = table.iter().position(|(p, _)| p == path)?;
    Some(table.swap_remove(i).1)
}

/// Closes the inherited sockets nothing took (exports the new command line no longer has).
pub fn close_unclaimed() {
    for (path, _) in std::mem::take(&mut *INHERITED.lock()) {
        warn!(
            "{}: inherited socket not used by any export; closed",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_the_round_trip_and_junk_is_skipped() {
        let a = Path::new("/run/a b.sock");
        let b = Path::new("/tmp/x:y.sock");
        let bad = Path::new("/tmp/new\nline.sock");
        let v = encode(&[(7, a), (9, b), (11, bad)]);
        assert_eq!(decode(&v), vec![(7, a.to_path_buf()), (9, b.to_path_buf())]);
        assert!(decode(b"x:/a\n5\n:/b\n6:\n").is_empty());
    }

    #[test]
    fn only_listening_unix_sockets_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        assert!(is_listening_unix_socket(std::os::fd::AsRawFd::as_raw_fd(
            &l
        )));
        let f = std::fs::File::open(dir.path()).unwrap();
        assert!(!is_listening_unix_socket(std::os::fd::AsRawFd::as_raw_fd(
            &f
        )));
        let (s, _t) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_listening_unix_socket(std::os::fd::AsRawFd::as_raw_fd(
            &s
        )));
        assert!(!is_listening_unix_socket(-1));
    }
}
