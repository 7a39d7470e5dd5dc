//! A raw file's allocation, as its file system reports it (SEEK_DATA / SEEK_HOLE): a hole
//! reads as zeros and holds no space. Block devices report everything as data.

use std::os::fd::AsRawFd;

use super::RawDevice;
use crate::engine::allocation::{push_run, Allocation, AllocationRun, MAX_QUERY_BYTES};
use crate::engine::{check_range, BlockDevice, BlockError};

/// Runs described per call at most (the caller asks again from where the answer ends).
const MAX_RUNS: usize = 4096;

impl RawDevice {
    /// Where the next `whence` (SEEK_DATA or SEEK_HOLE) at or after `pos` is; `None` when
    /// there is no more data (ENXIO), `Err` when the file system cannot tell.
    fn seek(&self, pos: u64, whence: libc::c_int) -> Result<Option<u64>, ()> {
        let at = libc::off_t::try_from(pos).map_err(|_| ())?;
        // SAFETY: lseek on a descriptor this device owns; its file position is never used
        // (all I/O is positional).
        let r = unsafe { libc::lseek(self.buffered.as_raw_fd(), at, whence) };
        if r < 0 {
            let enxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            return if enxio { Ok(None) } else { Err(()) };
        }
        u64::try_from(r).map(Some).map_err(|_| ())
    }

    pub(super) fn allocation_runs(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationRun>, BlockError> {
        check_range(offset, len, self.size())?;
        let end = offset + len.min(MAX_QUERY_BYTES);
        let mut runs = Vec::new();
        if self.is_block_device {
            push_run(&mut runs, end - offset, Allocation::Data);
            return Ok(runs);
        }
        let mut pos = offset;
        while pos < end && runs.len() < MAX_RUNS {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.clamp(pos, end),
                Ok(None) => end,
                Err(()) => {
                    push_run(&mut runs, end - pos, Allocation::Data);
                    break;
                }
            };
            push_run(&mut runs, data - pos, Allocation::Hole);
            pos = data;
            if pos >= end {
                break;
            }
            // Past the last data there is always a hole (at least at the end of the file).
            let hole = match self.seek(pos, libc::SEEK_HOLE) {
                Ok(Some(h)) => h.clamp(pos + 1, end),
                _ => end,
            };
            push_run(&mut runs, hole - pos, Allocation::Data);
            pos = hole;
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::raw::RawOptions;
    use crate::engine::Bufs;

    #[test]
    fn a_sparse_file_reports_its_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        drop(f);
        let opts = RawOptions {
            read_only: false,
            direct: false,
        };
        let dev = RawDevice::open(&path, opts).unwrap();
        dev.write(1 << 20, &Bufs::one(&[7u8; 65536])).unwrap();
        let runs = dev.allocation(0, 4 << 20).unwrap();
        let total: u64 = runs.iter().map(|r| r.len).sum();
        assert_eq!(total, 4 << 20);
        // The data lies where it was written (give or take the file system's block), the
        // rest is holes.
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(runs[0].state, Allocation::Hole, "{runs:?}");
        assert_eq!(runs[1].state, Allocation::Data, "{runs:?}");
        assert!(runs[0].len <= 1 << 20 && runs[0].len + runs[1].len >= (1 << 20) + 65536);
    }
}
