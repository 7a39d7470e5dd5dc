//! A raw file or host block device as a disk: the passthrough export.
//!
//! Aligned I/O goes through an O_DIRECT descriptor so the host page cache neither doubles the
//! memory used nor hides write errors until fsync; unaligned I/O (or a file system without
//! O_DIRECT) goes through a second, buffered descriptor. The kernel keeps the two coherent:
//! direct I/O writes back and invalidates cached pages of the range it touches.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;

use super::aligned::pieces_aligned;
use super::io::{FlushFd, FlushState};
use super::iov::Piece;
use super::{
    check_range, BlockDevice, BlockError, Bufs, BufsMut, DataDevice, Extent, MapOp, Mapping,
};

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// How to open a raw device.
#[derive(Clone, Copy, Debug)]
pub struct RawOptions {
    pub read_only: bool,
    /// Use O_DIRECT for aligned I/O where the file system supports it.
    pub direct: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            read_only: false,
            direct: true,
        }
    }
}

/// A file or block device exported byte for byte.
pub struct RawDevice {
    buffered: File,
    direct: Option<File>,
    is_block_device: bool,
    /// Bytes, a multiple of 512; changes only through `refresh_size`.
    size: AtomicU64,
    read_only: bool,
    /// Sticky: once a flush failed (here or through a ring), every later one fails.
    flushed: Arc<FlushState>,
}

impl RawDevice {
    /// Opens an existing file or block device.
    pub fn open(path: &Path, opts: RawOptions) -> io::Result<Self> {
        let open = |flags: libc::c_int| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let buffered = open(0)?;
        let meta = buffered.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let size = if is_block_device {
            block_device_size(&buffered)?
        } else {
            meta.len()
        } & !511;
        // File systems without O_DIRECT (tmpfs) refuse the open: then everything is buffered.
        let direct = if opts.direct {
            open(libc::O_DIRECT).ok()
        } else {
            None
        };
        Ok(RawDevice {
            buffered,
            direct,
            is_block_device,
            size: AtomicU64::new(size),
            read_only: opts.read_only,
            flushed: Arc::default(),
        })
    }

    /// Creates a sparse file of `size` bytes if `path` does not exist yet.
    pub fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f.set_len(size),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Re-reads the size of the file or device (after it grew); returns it.
    pub fn refresh_size(&self) -> io::Result<u64> {
        let size = if self.is_block_device {
            block_device_size(&self.buffered)?
        } else {
            self.buffered.metadata()?.len()
        } & !511;
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    /// Whether aligned I/O bypasses the host page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let buf = zeros.get(..n as usize).unwrap_or(&zeros);
            pwrite_all(&self.buffered, Bufs::one(buf).pieces(), offset + done)
                .map_err(|e| BlockError::io(offset + done, e))?;
            done += n;
        }
        Ok(())
    }

    fn range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: both ioctls read a [u64; 2] from the pointer, which is valid for the call.
        let rc = unsafe { libc::ioctl(self.buffered.as_raw_fd(), request, range.as_ptr()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (off, len) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        // SAFETY: fallocate takes plain integers; the descriptor is owned by self.
        let rc = unsafe { libc::fallocate(self.buffered.as_raw_fd(), mode, off, len) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// preadv until every buffer is full; a read past the end of the file is an error.
fn pread_all(file: &File, pieces: &[Piece], offset: u64) -> io::Result<()> {
    transfer_fully(
        pieces,
        offset,
        io::ErrorKind::UnexpectedEof,
        |left, offset| {
            let count = left.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            // SAFETY: `Piece` is laid out as iovec and each is valid for writes for this call (the
            // buffer lists' contract); count never exceeds the list.
            let n = unsafe {
                libc::preadv(
                    file.as_raw_fd(),
                    left.as_ptr().cast::<libc::iovec>(),
                    count,
                    off_t(offset)?,
                )
            };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        },
    )
}

/// pwritev until every buffer is written.
fn pwrite_all(file: &File, pieces: &[Piece], offset: u64) -> io::Result<()> {
    transfer_fully(pieces, offset, io::ErrorKind::WriteZero, |left, offset| {
        let count = left.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `Piece` is laid out as iovec and each is valid for reads for this call;
        // count never exceeds the list.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                left.as_ptr().cast::<libc::iovec>(),
                count,
                off_t(offset)?,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })
}

/// Calls `op` (one preadv or pwritev, at most `IOV_MAX` pieces) until every piece is done: a
/// short transfer goes on from where it stopped, EINTR is retried, and a transfer of nothing
/// (end of file, full device) is an error of kind `eof`.
fn transfer_fully(
    pieces: &[Piece],
    mut offset: u64,
    eof: io::ErrorKind,
    mut op: impl FnMut(&[Piece], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut left: SmallVec<[Piece; 4]> = pieces.iter().copied().filter(|p| p.len > 0).collect();
    let mut first = 0usize;
    while let Some(rest) = left.get(first..).filter(|r| !r.is_empty()) {
        match op(rest, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(0) => return Err(eof.into()),
            Ok(mut n) => {
                offset += n as u64;
                while n > 0 {
                    let Some(p) = left.get_mut(first) else { break };
                    if n >= p.len {
                        n -= p.len;
                        first += 1;
                    } else {
                        p.ptr = p.ptr.wrapping_add(n);
                        p.len -= n;
                        n = 0;
                    }
                }
            }
        }
    }
    Ok(())
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A file's holes, from SEEK_DATA/SEEK_HOLE (raw_allocation.rs).
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<crate::engine::AllocationRun>, BlockError> {
        self.allocation_runs(offset, len)
    }

    fn map(&self, op: MapOp, offset: u64, len: u64) -> Result<Option<Mapping>, BlockError> {
        if op == MapOp::Write {
            self.writable()?;
        }
        check_range(offset, len, self.size())?;
        let (fd, direct) = match &self.direct {
            Some(f) => (f.as_raw_fd(), true),
            None => (self.buffered.as_raw_fd(), false),
        };
        Ok(Some(Mapping::unheld(vec![Extent::File {
            fd,
            offset,
            len,
            direct,
        }])))
    }

    fn flush_fd(&self) -> Option<FlushFd> {
        Some(FlushFd {
            fd: self.buffered.as_raw_fd(),
            state: self.flushed.clone(),
        })
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        check_range(offset, bufs.len(), self.size())?;
        let pieces = bufs.pieces();
        // A failed direct attempt retries the whole list: `pread_all` works on a copy.
        if let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| pieces_aligned(offset, pieces))
        {
            match pread_all(direct, pieces, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(BlockError::io(offset, e)),
            }
        }
        pread_all(&self.buffered, pieces, offset).map_err(|e| BlockError::io(offset, e))
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, bufs.len(), self.size())?;
        let pieces = bufs.pieces();
        if let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| pieces_aligned(offset, pieces))
        {
            match pwrite_all(direct, pieces, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(BlockError::io(offset, e)),
            }
        }
        pwrite_all(&self.buffered, pieces, offset).map_err(|e| BlockError::io(offset, e))
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.flushed.check()?;
        self.flushed.record(self.buffered.sync_data())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        let result = if self.is_block_device {
            self.range_ioctl(BLKDISCARD, offset, len)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match result {
            Ok(()) => Ok(()),
            // Discard is advisory: a host that cannot release space has still done its duty.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(BlockError::io(offset, e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        let result = if self.is_block_device {
            self.range_ioctl(BLKZEROOUT, offset, len)
        } else if may_unmap {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match result {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                ) =>
            {
                self.zero_by_writing(offset, len)
            }
            Err(e) => Err(BlockError::io(offset, e)),
        }
    }
}

impl DataDevice for RawDevice {
    fn grow_to(&self, size: u64) -> Result<u64, BlockError> {
        if !self.is_block_device && size > self.size() {
            self.writable()?;
            self.buffered
                .set_len(size)
                .map_err(|e| BlockError::io(size, e))?;
        }
        self.refresh_size().map_err(|e| BlockError::io(0, e))
    }

    fn reads_as_zeros(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if self.is_block_device || end > self.size() {
            return false;
        }
        let Ok(start) = libc::off_t::try_from(offset) else {
            return false;
        };
        // SAFETY: lseek on a descriptor this device owns; its file position is never used
        // (all I/O is positional).
        let next_data = unsafe { libc::lseek(self.buffered.as_raw_fd(), start, libc::SEEK_DATA) };
        if next_data < 0 {
            // ENXIO: no data at or after `offset`. Anything else: cannot tell.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        u64::try_from(next_data).is_ok_and(|d| d >= end)
    }

    fn preallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.is_block_device || self.read_only {
            return Ok(());
        }
        check_range(offset, len, self.size())?;
        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => Err(BlockError::io(offset, e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{IoSlice, IoSliceMut};
    use std::os::unix::fs::MetadataExt;

    fn device(size: u64) -> (tempfile::TempDir, RawDevice) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        RawDevice::create_sparse(&path, size).unwrap();
        let dev = RawDevice::open(&path, RawOptions::default()).unwrap();
        (dir, dev)
    }

    #[test]
    fn unaligned_buffers_fall_back_to_buffered_io() {
        let (_dir, dev) = device(1 << 20);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut backing = vec![0u8; 1024 + 1];
        backing[1..1001].copy_from_slice(&data);
        let tail = [7u8; 24];
        dev.write(
            512,
            &Bufs::from(&[IoSlice::new(&backing[1..1001]), IoSlice::new(&tail)][..]),
        )
        .unwrap();
        let mut out = vec![0u8; 1024];
        dev.read(512, &mut BufsMut::one(&mut out)).unwrap();
        assert_eq!(&out[..1000], &data[..]);
        assert_eq!(&out[1000..], &[7u8; 24][..]);
    }

    #[test]
    fn write_zeroes_and_discard_read_back_zeros() {
        let (_dir, dev) = device(1 << 20);
        dev.write(0, &Bufs::one(&vec![0xAB; 65536])).unwrap();
        dev.write_zeroes(4096, 8192, false).unwrap();
        dev.discard(32768, 4096).unwrap();
        let mut out = vec![0u8; 65536];
        dev.read(0, &mut BufsMut::one(&mut out)).unwrap();
        assert!(out[..4096].iter().all(|&b| b == 0xAB));
        assert!(out[4096..12288].iter().all(|&b| b == 0));
        assert!(out[32768..36864].iter().all(|&b| b == 0));
        assert!(out[36864..].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn holes_and_preallocated_space_read_as_zeros_and_written_data_does_not() {
        // Extents are file system blocks: use a range far larger than any.
        const MIB: u64 = 1 << 20;
        let (_dir, dev) = device(16 * MIB);
        assert!(
            dev.reads_as_zeros(0, 16 * MIB),
            "a new sparse file is one hole"
        );
        dev.write(4 * MIB, &Bufs::one(&vec![0xAB; 4096])).unwrap();
        assert!(!dev.reads_as_zeros(4 * MIB, MIB), "written");
        assert!(!dev.reads_as_zeros(3 * MIB, 2 * MIB), "holds written data");
        assert!(dev.reads_as_zeros(0, 3 * MIB), "before the data");
        assert!(dev.reads_as_zeros(8 * MIB, 8 * MIB), "after the data");
        assert!(
            !dev.reads_as_zeros(15 * MIB, 2 * MIB),
            "past the end: cannot tell"
        );
        assert!(
            !dev.reads_as_zeros(u64::MAX - 1, 2),
            "overflow: cannot tell"
        );

        let blocks = |d: &RawDevice| d.buffered.metadata().unwrap().blocks();
        let before = blocks(&dev);
        dev.preallocate(0, 16 * MIB).unwrap();
        assert!(
            blocks(&dev) * 512 >= 16 * MIB,
            "space allocated ({before} blocks before)"
        );
        assert!(
            dev.reads_as_zeros(0, 3 * MIB),
            "allocated but never written"
        );
        assert!(!dev.reads_as_zeros(4 * MIB, MIB), "the data is still there");
        let mut out = vec![0u8; 8192];
        dev.read(4 * MIB - 4096, &mut BufsMut::one(&mut out))
            .unwrap();
        assert!(out[..4096].iter().all(|&b| b == 0) && out[4096..].iter().all(|&b| b == 0xAB));
        assert!(dev.preallocate(15 * MIB, 2 * MIB).is_err(), "past the end");
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        RawDevice::create_sparse(&path, 4096).unwrap();
        let opts = RawOptions {
            read_only: true,
            direct: true,
        };
        let dev = RawDevice::open(&path, opts).unwrap();
        assert!(matches!(
            dev.write(0, &Bufs::one(&[0; 512])),
            Err(BlockError::ReadOnly)
        ));
    }

    /// A file that transfers at most `max` bytes per call, and fails once with EINTR.
    struct Stingy {
        bytes: Vec<u8>,
        max: usize,
        interrupted: bool,
    }

    impl Stingy {
        fn read(&mut self, pieces: &[Piece], offset: u64) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let start = (offset as usize).min(self.bytes.len());
            let n = self.max.min(pieces[0].len).min(self.bytes.len() - start);
            // SAFETY: the piece is a test buffer valid for `pieces[0].len` >= n bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(self.bytes[start..].as_ptr(), pieces[0].ptr, n)
            };
            Ok(n)
        }

        fn write(&mut self, pieces: &[Piece], offset: u64) -> io::Result<usize> {
            let start = offset as usize;
            let n = self.max.min(pieces[0].len);
            // SAFETY: as in `read`.
            unsafe {
                std::ptr::copy_nonoverlapping(pieces[0].ptr, self.bytes[start..].as_mut_ptr(), n)
            };
            Ok(n)
        }
    }

    #[test]
    fn short_transfers_are_continued_where_they_stopped() {
        let mut file = Stingy {
            bytes: vec![0; 4096],
            max: 100,
            interrupted: false,
        };
        let a: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let src = [IoSlice::new(&a), IoSlice::new(&b)];
        let bufs = Bufs::from(&src[..]);
        let eof = io::ErrorKind::WriteZero;
        transfer_fully(bufs.pieces(), 512, eof, |p, off| file.write(p, off)).unwrap();
        assert_eq!(&file.bytes[512..1212], &a[..]);
        assert_eq!(&file.bytes[1212..1512], &b[..]);
        let (mut x, mut y) = (vec![0u8; 650], vec![0u8; 350]);
        let mut dst = [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)];
        let bufs = BufsMut::from(&mut dst[..]);
        let eof = io::ErrorKind::UnexpectedEof;
        transfer_fully(bufs.pieces(), 512, eof, |p, off| file.read(p, off)).unwrap();
        drop(bufs);
        assert_eq!(&x[..], &a[..650]);
        assert_eq!(&y[..50], &a[650..]);
        assert_eq!(&y[50..], &b[..]);
    }

    #[test]
    fn a_read_that_stops_at_the_end_of_the_file_is_an_error_not_zeros() {
        let mut file = Stingy {
            bytes: vec![9; 1000],
            max: 4096,
            interrupted: true,
        };
        let mut out = vec![0u8; 512];
        let bufs = BufsMut::one(&mut out);
        let err = transfer_fully(
            bufs.pieces(),
            768,
            io::ErrorKind::UnexpectedEof,
            |p, off| file.read(p, off),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let src = Bufs::one(&[0; 512]);
        let err =
            transfer_fully(src.pieces(), 0, io::ErrorKind::WriteZero, |_, _| Ok(0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn a_data_file_truncated_under_the_device_fails_reads_past_its_end() {
        let (dir, dev) = device(1 << 20);
        dev.write(0, &Bufs::one(&vec![5u8; 65536])).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("disk"))
            .unwrap()
            .set_len(4096 + 100)
            .unwrap();
        let mut out = vec![0u8; 8192];
        assert!(matches!(
            dev.read(0, &mut BufsMut::one(&mut out)),
            Err(BlockError::Io { .. })
        ));
    }

    #[test]
    fn io_past_the_end_is_refused() {
        let (_dir, dev) = device(4096);
        let mut out = [0u8; 512];
        assert!(matches!(
            dev.read(4096, &mut BufsMut::one(&mut out)),
            Err(BlockError::OutOfRange { .. })
        ));
    }
}

#[path = "raw_allocation.rs"]
mod allocation;
