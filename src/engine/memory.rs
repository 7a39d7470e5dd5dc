//! A disk held in memory: the reference model for tests and a device with no host I/O cost.

use parking_lot::RwLock;

use super::{check_range, BlockDevice, BlockError, Bufs, BufsMut};

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

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        let bytes = self.bytes.read();
        let range = span(offset, bufs.len(), bytes.len() as u64)?;
        let src = bytes
            .get(range)
            .ok_or(BlockError::Unsupported("iovec length"))?;
        bufs.copy_from(src);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        let mut bytes = self.bytes.write();
        let range = span(offset, bufs.len(), bytes.len() as u64)?;
        let dst = bytes
            .get_mut(range)
            .ok_or(BlockError::Unsupported("iovec length"))?;
        bufs.copy_to(dst);
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
        dev.write(
            512,
            &Bufs::from(
                &[
                    std::io::IoSlice::new(&[1; 100]),
                    std::io::IoSlice::new(&[2; 412]),
                ][..],
            ),
        )
        .unwrap();
        let mut out = [0u8; 512];
        dev.read(512, &mut BufsMut::one(&mut out)).unwrap();
        assert_eq!(&out[..100], &[1; 100][..]);
        assert_eq!(&out[100..], &[2; 412][..]);
    }

    #[test]
    fn io_past_the_end_is_refused() {
        let dev = MemoryDevice::new(4096).unwrap();
        let mut out = [0u8; 512];
        let err = dev.read(4096, &mut BufsMut::one(&mut out)).unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }));
        assert!(dev.write_zeroes(u64::MAX - 10, 512, false).is_err());
    }
}
