//! Who may connect to a socket thinblk creates: its mode, owner and group.
//!
//! A vhost-user socket grants full access to a disk, so the default stays 0600 owned by the
//! daemon's user. A VMM that runs as another user (libvirt's QEMU runs as `libvirt-qemu`) is
//! let in by naming its group (`socket-group=kvm,socket-mode=0660`) or making it the owner.
//! The socket is bound with its inode mode already no wider than asked (see
//! [`bind_no_wider_than`]), then given its owner, group and exact mode under a temporary name,
//! and only then linked at its real path (`sockets.rs`): no path ever shows a socket more open
//! than asked.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The mode of a socket nobody asked otherwise for.
pub const DEFAULT_MODE: u32 = 0o600;

/// What was asked for a socket; each unset field falls back to the daemon's default, and to
/// mode 0600 and the daemon's own user and group after that.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketAccess {
    /// Permission bits (at most 0o777).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Numeric user id of the owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    /// Numeric group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

impl SocketAccess {
    /// Each field of `self`, or `defaults`' where `self` has none.
    pub fn or(self, defaults: SocketAccess) -> SocketAccess {
        SocketAccess {
            mode: self.mode.or(defaults.mode),
            owner: self.owner.or(defaults.owner),
            group: self.group.or(defaults.group),
        }
    }

    pub fn mode(&self) -> u32 {
        self.mode.unwrap_or(DEFAULT_MODE)
    }

    /// Gives the socket file at `path` its owner, group and mode. Ownership first: chown may
    /// clear mode bits, and the mode set last is then exactly the one asked for.
    pub fn apply(&self, path: &Path) -> io::Result<()> {
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::lchown(path, self.owner, self.group)?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode()))
    }
}

/// Why a mode, user or group was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("'{0}' is not an octal mode from 0 to 0777")]
    Mode(String),
    #[error("no user named '{0}'")]
    User(String),
    #[error("no group named '{0}'")]
    Group(String),
}

/// An octal mode such as `0660` or `660`.
pub fn parse_mode(s: &str) -> Result<u32, AccessError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(AccessError::Mode(s.into())),
    }
}

/// A user by name or number.
pub fn parse_user(s: &str) -> Result<u32, AccessError> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    lookup_id(s, Kind::User).ok_or_else(|| AccessError::User(s.into()))
}

/// A group by name or number.
pub fn parse_group(s: &str) -> Result<u32, AccessError> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    lookup_id(s, Kind::Group).ok_or_else(|| AccessError::Group(s.into()))
}

enum Kind {
    User,
    Group,
}

/// The id of a user or group from the system's databases (nsswitch), with the re-entrant
/// calls, growing the buffer while they say it is too small.
fn lookup_id(name: &str, kind: Kind) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 1024];
    loop {
        let found: *mut libc::c_void;
        let (rc, id) = match kind {
            Kind::User => {
                // SAFETY: passwd is plain data that getpwnam_r fills in.
                let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
                let mut out: *mut libc::passwd = std::ptr::null_mut();
                // SAFETY: every pointer is valid for the call: the name is NUL-terminated,
                // `buf` is writable for its length, `pw` and `out` are owned by this frame.
                let rc = unsafe {
                    libc::getpwnam_r(
                        cname.as_ptr(),
                        &mut pw,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        &mut out,
                    )
                };
                found = out.cast();
                (rc, pw.pw_uid)
            }
            Kind::Group => {
                // SAFETY: group is plain data that getgrnam_r fills in.
                let mut gr: libc::group = unsafe { std::mem::zeroed() };
                let mut out: *mut libc::group = std::ptr::null_mut();
                // SAFETY: as for getpwnam_r above.
                let rc = unsafe {
                    libc::getgrnam_r(
                        cname.as_ptr(),
                        &mut gr,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        &mut out,
                    )
                };
                found = out.cast();
                (rc, gr.gr_gid)
            }
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !found.is_null()).then_some(id);
    }
}

/// Binds a listening unix socket at `path` whose inode is created with at most `mode`'s
/// permission bits. Linux creates the file with the socket's own inode mode less the umask,
/// so the mode is set on the socket before it is bound: there is no moment where the file
/// exists with more bits than asked (the umask can only take bits away; the caller then sets
/// the exact mode).
pub fn bind_no_wider_than(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; a negative result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor this call just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchmod on a descriptor we own; no memory is passed.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o777) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call; `len` covers the family
    // and the NUL-terminated path, within the struct.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound descriptor we own; no memory is passed.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_are_octal_and_at_most_0777() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("0888").is_err());
        assert!(parse_mode("1777").is_err());
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("").is_err());
    }

    #[test]
    fn users_and_groups_are_found_by_name_or_number() {
        assert_eq!(parse_user("root"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert_eq!(parse_group("1234"), Ok(1234));
        assert!(matches!(
            parse_group("no-such-group-here"),
            Err(AccessError::Group(_))
        ));
        assert!(matches!(
            parse_user("no-such-user-here"),
            Err(AccessError::User(_))
        ));
    }

    #[test]
    fn an_export_setting_wins_over_the_daemon_default_field_by_field() {
        let daemon = SocketAccess {
            mode: Some(0o660),
            owner: None,
            group: Some(7),
        };
        let export = SocketAccess {
            mode: Some(0o600),
            ..SocketAccess::default()
        };
        let got = export.or(daemon);
        assert_eq!((got.mode(), got.owner, got.group), (0o600, None, Some(7)));
        assert_eq!(SocketAccess::default().mode(), 0o600);
    }

    #[test]
    fn a_socket_is_born_no_wider_than_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A plain bind makes the file 0777 less the umask (0755 under the usual 022), so
        // anything but 0600 here means the mode was not set before the bind. The umask is
        // left alone: it is process wide and other tests create files meanwhile.
        let _listener = bind_no_wider_than(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
