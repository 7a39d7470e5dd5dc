//! A disk held in memory: the reference model for tests and a device with no host I/O cost.

use std::io::{IoSlice, IoSliceMut};

use parking_lot::RwLock;

use super::{check_range, iovec_len, BlockDevice, BlockError};

/// A zero-filled disk of fixed size kept in a `Vec<u8>`.
pub struct MemoryDevice {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryDevice {
    /// A disk of `size` bytes (rounded down to a whole sector).
    pub fn new(size: u64) -> Result<Self, BlockError> {
        let size = usize::try_from(size & !511).map_err(|_| BlockError::Unsupported("size"))?;
        Ok(MemoryDevice {
            bytes: RwLock::new(vec![0; size]),
        })
    }
}

/// Byte range `[offset, offset + len)` as `usize` indices, after a bounds check.
fn span(offset: u64, len: u64, size: u64) -> Result<std::ops::Range<usize>, BlockError> {
    check_range(offset, len, size)?;
    let start =
        usize::try_from(offset).map_err(|_| BlockError::OutOfRange { offset, len, size })?;
    let len_usize =
        usize::try_from(len).map_err(|_| BlockError::OutOfRange { offset, len, size })?;
    Ok(start..start + len_usize)
}

fn zero(bytes: &mut [u8], range: std::ops::Range<usize>) {
    if let Some(dst) = bytes.get_mut(range) {
        dst.fill(0);
    }
}

impl BlockDevice for MemoryDevice {
    /// Nothing here ever waits: requests run on the queue worker itself.
    fn open_queue(
        self: std::sync::Arc<Self>,
        opts: &super::QueueOptions,
    ) -> std::io::Result<Box<dyn super::IoQueue>> {
        super::io::InlineQueue::open(self, opts)
    }

    fn size(&self) -> u64 {
        self.bytes.read().len() as u64
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError> {
        let bytes = self.bytes.read();
        let len = iovec_len(bufs).ok_or(BlockError::Unsupported("iovec length"))?;
        let mut pos = span(offset, len, bytes.len() as u64)?.start;
        for buf in bufs.iter_mut() {
            let src = bytes
                .get(pos..pos + buf.len())
                .ok_or(BlockError::Unsupported("iovec length"))?;
            buf.copy_from_slice(src);
            pos += buf.len();
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        let mut bytes = self.bytes.write();
        let len = iovec_len(bufs).ok_or(BlockError::Unsupported("iovec length"))?;
        let mut pos = span(offset, len, bytes.len() as u64)?.start;
        for buf in bufs {
            let dst = bytes
                .get_mut(pos..pos + buf.len())
                .ok_or(BlockError::Unsupported("iovec length"))?;
            dst.copy_from_slice(buf);
            pos += buf.len();
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        let mut bytes = self.bytes.write();
        let range = span(offset, len, bytes.len() as u64)?;
        zero(&mut bytes, range);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_write_reads_back_gathered() {
        let dev = MemoryDevice::new(4096).unwrap();
        dev.write(512, &[IoSlice::new(&[1; 100]), IoSlice::new(&[2; 412])])
            .unwrap();
        let mut out = [0u8; 512];
        dev.read(512, &mut [IoSliceMut::new(&mut out)]).unwrap();
        assert_eq!(&out[..100], &[1; 100][..]);
        assert_eq!(&out[100..], &[2; 412][..]);
    }

    #[test]
    fn io_past_the_end_is_refused() {
        let dev = MemoryDevice::new(4096).unwrap();
        let mut out = [0u8; 512];
        let err = dev
            .read(4096, &mut [IoSliceMut::new(&mut out)])
            .unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }));
        assert!(dev.write_zeroes(u64::MAX - 10, 512, false).is_err());
    }
}
