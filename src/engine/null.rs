//! A disk with no storage: reads return zeros, writes vanish. It measures what the vhost layer
//! and the client cost with no host I/O at all (the counterpart of QEMU's `null-co`).

use super::{check_range, BlockDevice, BlockError, Bufs, BufsMut};

/// A disk of fixed size that stores nothing but still refuses out-of-range I/O.
pub struct NullDevice {
    size: u64,
}

impl NullDevice {
    /// A disk of `size` bytes (rounded down to a whole sector).
    pub fn new(size: u64) -> Self {
        NullDevice { size: size & !511 }
    }
}

impl BlockDevice for NullDevice {
    /// Nothing here ever waits: requests run on the queue worker itself.
    fn open_queue(
        self: std::sync::Arc<Self>,
        opts: &super::QueueOptions,
    ) -> std::io::Result<Box<dyn super::IoQueue>> {
        super::io::InlineQueue::open(self, opts)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        check_range(offset, bufs.len(), self.size)?;
        bufs.zero();
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        check_range(offset, bufs.len(), self.size)
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.size)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fill_every_buffer_with_zeros() {
        let dev = NullDevice::new(1 << 20);
        let (mut a, mut b) = ([7u8; 512], [9u8; 1024]);
        dev.read(
            4096,
            &mut BufsMut::from(
                &mut [
                    std::io::IoSliceMut::new(&mut a),
                    std::io::IoSliceMut::new(&mut b),
                ][..],
            ),
        )
        .unwrap();
        assert!(a.iter().chain(b.iter()).all(|&x| x == 0));
    }

    #[test]
    fn writes_are_accepted_and_forgotten() {
        let dev = NullDevice::new(1 << 20);
        dev.write(0, &Bufs::one(&[1; 4096])).unwrap();
        dev.flush().unwrap();
        let mut out = [5u8; 4096];
        dev.read(0, &mut BufsMut::one(&mut out)).unwrap();
        assert_eq!(out, [0; 4096]);
    }

    #[test]
    fn size_is_rounded_down_to_a_sector() {
        assert_eq!(NullDevice::new(4096 + 100).size(), 4096);
    }

    #[test]
    fn every_operation_refuses_ranges_past_the_end() {
        let dev = NullDevice::new(8192);
        let mut out = [0u8; 512];
        let past = |r: Result<(), BlockError>| matches!(r, Err(BlockError::OutOfRange { .. }));
        assert!(past(dev.read(8192, &mut BufsMut::one(&mut out))));
        assert!(past(dev.write(7680, &Bufs::one(&[0; 1024]))));
        assert!(past(dev.discard(u64::MAX - 10, 512)));
        assert!(past(dev.write_zeroes(8192, 512, true)));
        assert!(dev.write_zeroes(7680, 512, false).is_ok());
    }
}
