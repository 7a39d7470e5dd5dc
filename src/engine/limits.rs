//! The largest disk thinblk accepts, and the check every way of sizing a disk goes through
//! (the engine's create and resize, QMP, `--export size=` and `null=`).
//!
//! A disk's size has to be addressable by everything that handles it:
//! - the host and the guest kernel address a block device's bytes with `off_t`/`loff_t`, a
//!   signed 64-bit count: at most `i64::MAX` bytes (Linux's `MAX_LFS_FILESIZE`; a disk
//!   image file or a loop device of the disk cannot be larger, nor can `qemu-img` or `dd`
//!   seek past it);
//! - the kernel's device-mapper table gives a thin device's length in 512-byte sectors
//!   (`sector_t`, unsigned 64-bit), but `dm_table_add_target` refuses a target that ends past
//!   `LLONG_MAX >> SECTOR_SHIFT` sectors ("too large device"): 2^54 - 1 sectors, which is
//!   again 2^63 - 512 bytes. dm-thin's mapping btree is keyed by 64-bit virtual block
//!   numbers, which hold more;
//! - thin_dump's XML stores no device size at all, only 64-bit block numbers in mappings.
//!
//! So the limit is `off_t`'s rounded down to a whole sector, the same as the kernel's table:
//! 2^63 - 512 bytes. A disk of any accepted size can also move between thinblk and LVM thin.

/// Bytes in a sector, the unit of every disk size.
pub const SECTOR_BYTES: u64 = 512;

/// The largest disk size: `i64::MAX` (the largest `off_t`) rounded down to a whole sector.
pub const MAX_DEVICE_BYTES: u64 = i64::MAX as u64 / SECTOR_BYTES * SECTOR_BYTES;

/// Why a disk cannot have a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size {0} is not a positive multiple of 512 bytes")]
    NotSectors(u64),
    #[error(
        "size {0} is past the largest disk size, {MAX_DEVICE_BYTES} bytes (2^63 - 512: the \
         host and guest address disk bytes with a signed 64-bit off_t, and the kernel's \
         device-mapper table stops there too)"
    )]
    TooLarge(u64),
}

/// Whether a disk can have `size` bytes.
pub fn check_device_size(size: u64) -> Result<(), SizeError> {
    if size == 0 || !size.is_multiple_of(SECTOR_BYTES) {
        return Err(SizeError::NotSectors(size));
    }
    if size > MAX_DEVICE_BYTES {
        return Err(SizeError::TooLarge(size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_size_is_the_last_whole_sector_off_t_can_address() {
        assert_eq!(MAX_DEVICE_BYTES, (1 << 63) - 512);
        assert!(i64::try_from(MAX_DEVICE_BYTES).is_ok());
        assert_eq!(check_device_size(MAX_DEVICE_BYTES), Ok(()));
        assert_eq!(
            check_device_size(MAX_DEVICE_BYTES + 512),
            Err(SizeError::TooLarge(1 << 63))
        );
        assert_eq!(check_device_size(0), Err(SizeError::NotSectors(0)));
        assert_eq!(check_device_size(513), Err(SizeError::NotSectors(513)));
        let msg = SizeError::TooLarge(1 << 63).to_string();
        assert!(msg.contains("9223372036854775296"), "{msg}");
    }
}
