//! Guest memory regions as a frontend describes them (SET_MEM_TABLE, ADD_MEM_REG), checked
//! before anything is mapped.
//!
//! vm-memory maps whatever it is given: a region longer than the file behind it maps fine and
//! raises SIGBUS, which kills the whole daemon, on the first access past the end. So every
//! region is compared with its fd here, once, and everything below can trust the map:
//! - the fd must be a regular file (a memfd, a tmpfs or hugetlbfs file, an ordinary file):
//!   pipes, sockets, devices and directories are refused;
//! - `mmap_offset + memory_size` must lie within the file (overflow-checked), and sizes must
//!   be non-zero, with no guest or frontend address range wrapping past 2^64;
//! - the file must not be able to shrink later: a memfd sealed with `F_SEAL_SHRINK` (QEMU's
//!   `memory-backend-memfd` seals by default) is taken as it is, a memfd that still allows
//!   sealing gets `F_SEAL_SHRINK` added here (the frontend's guest memory never shrinks).
//!   Files that cannot be sealed are accepted only if the export allows it
//!   ([`UnsealedMemory`]); see SECURITY.md for why.
//! - regions must not overlap, in guest physical or in frontend virtual addresses.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Regions one SET_MEM_TABLE may carry (the message has room for 8, as QEMU's
/// `VHOST_MEMORY_BASELINE_NREGIONS`).
pub const MAX_TABLE_REGIONS: usize = 8;

/// What a region whose file could still shrink gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsealedMemory {
    /// Refused: only memory that cannot shrink under the daemon is mapped.
    Refuse,
    /// Mapped after the size check; a frontend that truncates the file afterwards can kill
    /// the daemon (SIGBUS). Needed for frontends that hand over unsealable memfds (libblkio)
    /// or files (QEMU's `memory-backend-file`).
    Accept,
}

/// One region as checked: where it lies for the guest and for the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub guest: u64,
    pub user: u64,
    pub size: u64,
}

/// Why a region is refused.
#[derive(Debug)]
pub enum RegionError {
    ZeroSize,
    /// guest, frontend or file offset + size past 2^64.
    Wraps(&'static str),
    NotAFile(&'static str),
    PastEof {
        end: u64,
        file_size: u64,
    },
    Unsealed,
    Overlaps {
        other_guest: u64,
    },
    TooMany {
        limit: usize,
    },
    Stat(io::Error),
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::ZeroSize => write!(f, "region of zero bytes"),
            RegionError::Wraps(what) => write!(f, "{what} address range wraps past 2^64"),
            RegionError::NotAFile(kind) => write!(f, "region fd is a {kind}, not a file"),
            RegionError::PastEof { end, file_size } => write!(
                f,
                "region ends at file offset {end}, past the end of its file ({file_size} bytes)"
            ),
            RegionError::Unsealed => write!(
                f,
                "region file can shrink (no F_SEAL_SHRINK and sealing not allowed)"
            ),
            RegionError::Overlaps { other_guest } => {
                write!(f, "region overlaps the region at guest {other_guest:#x}")
            }
            RegionError::TooMany { limit } => write!(f, "more than {limit} regions"),
            RegionError::Stat(e) => write!(f, "cannot inspect the region fd: {e}"),
        }
    }
}

impl std::error::Error for RegionError {}

/// The fields of a region message, before they are trusted.
#[derive(Clone, Copy, Debug)]
pub struct Proposed {
    pub guest: u64,
    pub size: u64,
    pub user: u64,
    pub offset: u64,
}

/// Checks one region against its file (see the module comment). `fd` is not kept.
pub fn check(
    p: Proposed,
    fd: BorrowedFd<'_>,
    unsealed: UnsealedMemory,
) -> Result<Region, RegionError> {
    if p.size == 0 {
        return Err(RegionError::ZeroSize);
    }
    p.guest
        .checked_add(p.size)
        .ok_or(RegionError::Wraps("guest"))?;
    p.user
        .checked_add(p.size)
        .ok_or(RegionError::Wraps("frontend"))?;
    let end = p
        .offset
        .checked_add(p.size)
        .ok_or(RegionError::Wraps("file offset"))?;
    let (kind, file_size) = file_kind_and_size(fd)?;
    if kind != libc::S_IFREG {
        return Err(RegionError::NotAFile(kind_name(kind)));
    }
    if end > file_size {
        return Err(RegionError::PastEof { end, file_size });
    }
    if !cannot_shrink(fd) && unsealed == UnsealedMemory::Refuse {
        return Err(RegionError::Unsealed);
    }
    Ok(Region {
        guest: p.guest,
        user: p.user,
        size: p.size,
    })
}

/// Refuses `new` if it overlaps any region of `table` in guest or frontend addresses.
pub fn check_disjoint(new: &Region, table: &[Region]) -> Result<(), RegionError> {
    // Both ends were checked not to wrap, so `start + size` is exact.
    let meets = |a: u64, b: u64, size_a: u64, size_b: u64| a < b + size_b && b < a + size_a;
    match table.iter().find(|r| {
        meets(new.guest, r.guest, new.size, r.size) || meets(new.user, r.user, new.size, r.size)
    }) {
        Some(r) => Err(RegionError::Overlaps {
            other_guest: r.guest,
        }),
        None => Ok(()),
    }
}

fn file_kind_and_size(fd: BorrowedFd<'_>) -> Result<(libc::mode_t, u64), RegionError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` into memory we own and reads nothing else; the fd
    // is borrowed, so it stays open during the call.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(RegionError::Stat(io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    let size = u64::try_from(st.st_size).unwrap_or(0);
    Ok((st.st_mode & libc::S_IFMT, size))
}

fn kind_name(kind: libc::mode_t) -> &'static str {
    match kind {
        libc::S_IFIFO => "pipe",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        _ => "special file (anonymous inode)",
    }
}

/// Whether the file is sealed against shrinking, sealing it if it allows sealing.
fn cannot_shrink(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GET_SEALS only reads the seals of the borrowed fd's file.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        // Not a memfd or shmem file: nothing can keep it from being truncated.
        return false;
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        return true;
    }
    if seals & libc::F_SEAL_SEAL != 0 {
        return false;
    }
    // SAFETY: F_ADD_SEALS changes only the seals of the borrowed fd's file.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) == 0 }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn memfd(size: u64, flags: libc::c_uint) -> File {
        // SAFETY: memfd_create with a NUL-terminated name returns a new fd we then own.
        let fd = unsafe { libc::memfd_create(c"region-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    fn at(guest: u64, size: u64, offset: u64) -> Proposed {
        Proposed {
            guest,
            size,
            user: 0x7f00_0000_0000 + guest,
            offset,
        }
    }

    #[test]
    fn a_region_longer_than_its_file_is_refused() {
        let f = memfd(8 * MIB, libc::MFD_ALLOW_SEALING);
        let e = check(at(0, 32 * MIB, 0), f.as_fd(), UnsealedMemory::Refuse).unwrap_err();
        assert!(
            matches!(e, RegionError::PastEof { end, file_size } if end == 32 * MIB && file_size == 8 * MIB)
        );
        let e = check(at(0, 8 * MIB, 4096), f.as_fd(), UnsealedMemory::Refuse).unwrap_err();
        assert!(matches!(e, RegionError::PastEof { .. }));
        check(
            at(0, 8 * MIB - 4096, 4096),
            f.as_fd(),
            UnsealedMemory::Refuse,
        )
        .unwrap();
    }

    #[test]
    fn zero_sizes_and_wrapping_ranges_are_refused() {
        let f = memfd(MIB, libc::MFD_ALLOW_SEALING);
        let fd = f.as_fd();
        let r = UnsealedMemory::Refuse;
        assert!(matches!(
            check(at(0, 0, 0), fd, r),
            Err(RegionError::ZeroSize)
        ));
        assert!(matches!(
            check(at(u64::MAX - 4095, MIB, 0), fd, r),
            Err(RegionError::Wraps("guest"))
        ));
        let mut p = at(0, MIB, 0);
        p.user = u64::MAX;
        assert!(matches!(
            check(p, fd, r),
            Err(RegionError::Wraps("frontend"))
        ));
        assert!(matches!(
            check(at(0, MIB, u64::MAX), fd, r),
            Err(RegionError::Wraps("file offset"))
        ));
    }

    #[test]
    fn pipes_and_sockets_are_not_memory() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check(at(0, 4096, 0), a.as_fd(), UnsealedMemory::Accept).unwrap_err();
        assert!(matches!(e, RegionError::NotAFile("socket")), "{e}");
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors nobody else owns.
        let (r, _w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let e = check(at(0, 4096, 0), r.as_fd(), UnsealedMemory::Accept).unwrap_err();
        assert!(matches!(e, RegionError::NotAFile("pipe")), "{e}");
    }

    #[test]
    fn a_sealable_memfd_is_sealed_against_shrinking() {
        let f = memfd(MIB, libc::MFD_ALLOW_SEALING);
        check(at(0, MIB, 0), f.as_fd(), UnsealedMemory::Refuse).unwrap();
        assert!(
            f.set_len(MIB / 2).is_err(),
            "the memfd can no longer shrink"
        );
        f.set_len(2 * MIB).unwrap();
    }

    #[test]
    fn an_unsealable_file_is_mapped_only_if_the_export_allows_it() {
        let f = memfd(MIB, 0);
        let e = check(at(0, MIB, 0), f.as_fd(), UnsealedMemory::Refuse).unwrap_err();
        assert!(matches!(e, RegionError::Unsealed));
        check(at(0, MIB, 0), f.as_fd(), UnsealedMemory::Accept).unwrap();
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(MIB).unwrap();
        assert!(check(at(0, MIB, 0), plain.as_fd(), UnsealedMemory::Refuse).is_err());
        check(at(0, MIB, 0), plain.as_fd(), UnsealedMemory::Accept).unwrap();
    }

    #[test]
    fn overlaps_in_guest_or_frontend_addresses_are_refused() {
        let table = [Region {
            guest: MIB,
            user: 0x10 * MIB,
            size: MIB,
        }];
        let r = |guest, user, size| Region { guest, user, size };
        assert!(check_disjoint(&r(0, 0, MIB), &table).is_ok());
        assert!(check_disjoint(&r(2 * MIB, 0x11 * MIB, MIB), &table).is_ok());
        assert!(check_disjoint(&r(MIB + 4096, 0, 4096), &table).is_err());
        assert!(check_disjoint(&r(0, 0, MIB + 1), &table).is_err());
        assert!(check_disjoint(&r(8 * MIB, 0x10 * MIB + 4096, 4096), &table).is_err());
    }
}
