//! Creating a listening unix socket safely: mode 0600 (or the owner, group and mode asked,
//! see `socket_access.rs`), stale sockets replaced, live ones and non-socket files left alone.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

pub mod inherited;

use crate::socket_access::{bind_no_wider_than, SocketAccess};

/// Why a socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0} is in use by a running server")]
    Live(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("cannot create socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Binds `path` mode 0600, replacing a stale socket left by a process that died.
pub fn bind_private(path: &Path) -> Result<UnixListener, SocketError> {
    bind_with(path, &SocketAccess::default())
}

/// [`bind_private`] with the owner, group and mode in `access`.
pub fn bind_with(path: &Path, access: &SocketAccess) -> Result<UnixListener, SocketError> {
    // Handed over by the process this one upgraded from: already bound, with the owner,
    // group and mode it was given, and listening.
    if let Some(listener) = inherited::take(path) {
        return Ok(listener);
    }
    let name = path.display().to_string();
    let io_err = |source| SocketError::Io {
        path: name.clone(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::Live(name));
            }
            fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => return Err(SocketError::NotASocket(name)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // The socket grants full access to the disk: only those asked for may connect. It is
    // bound under a temporary name, born no wider than its mode, given its owner, group and
    // exact mode, and only then linked at its real path, so the path never shows a socket
    // with other permissions (nor one that is not ready).
    let tmp = temporary_name(path);
    let _ = fs::remove_file(&tmp);
    let listener = bind_no_wider_than(&tmp, access.mode()).map_err(io_err)?;
    let published = access.apply(&tmp).and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match published {
        Ok(()) => Ok(listener),
        // Someone created the path meanwhile: leave it to them.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(SocketError::Live(name)),
        Err(e) => Err(io_err(e)),
    }
}

/// A short name beside `path` (socket paths are limited to 107 bytes).
fn temporary_name(path: &Path) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".tb{}-{n}.sock", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_private_and_stale_ones_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = bind_private(&path).unwrap();
        let mode = std::os::unix::fs::MetadataExt::mode(&fs::metadata(&path).unwrap()) & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind_private(&path), Err(SocketError::Live(_))));
        drop(first);
        bind_private(&path).unwrap();
    }

    #[test]
    fn a_socket_gets_the_group_and_mode_asked() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // SAFETY: getegid takes nothing and cannot fail.
        let gid = unsafe { libc::getegid() };
        let access = SocketAccess {
            mode: Some(0o660),
            owner: None,
            group: Some(gid),
        };
        let _l = bind_with(&path, &access).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        // No temporary name is left beside it.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            bind_private(&path),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn a_directory_or_a_symlink_is_never_replaced_or_followed() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(matches!(
            bind_private(&sub),
            Err(SocketError::NotASocket(_))
        ));
        assert!(sub.is_dir());
        let target = dir.path().join("precious");
        fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            bind_private(&link),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        // A dangling symlink is not a socket either: nothing is created where it points.
        let dangling = dir.path().join("dangling.sock");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &dangling).unwrap();
        assert!(matches!(
            bind_private(&dangling),
            Err(SocketError::NotASocket(_))
        ));
        assert!(!dir.path().join("elsewhere").exists());
    }
}
