//! The virtio-blk feature bits and configuration space this device offers.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const SECTOR_SIZE: u64 = 512;
/// Logical block size the guest sees; physical blocks are 4 KiB (see `PHYSICAL_BLOCK_EXP`).
pub const BLK_SIZE: u32 = 512;
const PHYSICAL_BLOCK_EXP: u8 = 3;
const MIN_IO_SECTORS: u16 = 8;

/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Most segments one DISCARD or WRITE_ZEROES request may carry.
pub const MAX_RANGE_SEGMENTS: u32 = 32;
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Longest data segment (one descriptor's worth of data) a request may have: `size_max`.
pub const SIZE_MAX: u32 = 2 << 20;
/// Most data segments a request may have on any queue: `seg_max` of the largest queue (1024
/// descriptors, less header and status). It stays below the host's IOV_MAX (1024), so one
/// request's buffers fit one vectored system call.
pub const SEG_MAX_CAP: u32 = 1022;
/// The most bytes one request can move: `SEG_MAX_CAP` segments of `SIZE_MAX`, 2044 MiB. That is
/// within the used ring's 32-bit length, within one `preadv`/`pwritev` (Linux moves at most
/// 2 GiB - 4 KiB per call), and within the 31 bits libblkio computes `max-transfer` in.
pub const MAX_TRANSFER: u64 = SEG_MAX_CAP as u64 * SIZE_MAX as u64;
/// Linux's MAX_RW_COUNT: the most one read or write system call moves.
const HOST_ONE_CALL: u64 = (i32::MAX as u64) & !4095;
const _: () = assert!(MAX_TRANSFER < u32::MAX as u64, "the used length is a u32");
const _: () = assert!(MAX_TRANSFER <= HOST_ONE_CALL);
const _: () = assert!(
    MAX_TRANSFER <= i32::MAX as u64,
    "libblkio's max-transfer is an i32"
);
const _: () = assert!(SEG_MAX_CAP < 1024, "IOV_MAX");
const _: () = assert!(SIZE_MAX.is_multiple_of(BLK_SIZE));

/// What one request may carry on a queue: advertised in the config space (`seg_max`,
/// `size_max`; virtio-blk has no separate transfer limit, so the largest request is their
/// product) and enforced where a chain is framed, before any device sees the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most descriptors in a chain: the queue size (a driver must not build a longer chain,
    /// virtio 1.2, 2.7.5.3.1), or header, `seg_max` data segments and status if that is more.
    pub max_descriptors: u32,
    /// Most non-empty data segments.
    pub seg_max: u32,
    /// Most bytes in one data segment.
    pub size_max: u32,
}

impl RequestLimits {
    /// The limits of a queue of `queue_size` descriptors. A driver must not build a chain
    /// longer than the queue (virtio 1.2, 2.7.5.3.1), so it has room for the header, the
    /// status and `queue_size - 2` data segments; at least one, so tiny queues still work
    /// (through an indirect table).
    pub const fn for_queue(queue_size: u16) -> RequestLimits {
        let room = (queue_size as u32).saturating_sub(2);
        let seg_max = if room == 0 {
            1
        } else if room > SEG_MAX_CAP {
            SEG_MAX_CAP
        } else {
            room
        };
        let queue = queue_size as u32;
        RequestLimits {
            max_descriptors: if queue > seg_max + 2 {
                queue
            } else {
                seg_max + 2
            },
            seg_max,
            size_max: SIZE_MAX,
        }
    }

    /// The most bytes a request within these limits moves.
    pub const fn max_transfer(&self) -> u64 {
        self.seg_max as u64 * self.size_max as u64
    }
}

/// `seg_max` of a queue of `queue_size` descriptors (see [`RequestLimits::for_queue`]).
pub const fn seg_max(queue_size: u16) -> u32 {
    RequestLimits::for_queue(queue_size).seg_max
}

/// Bytes of config space up to and including `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;
/// Offset of the `writeback` byte, the only field a driver may write.
pub const WRITEBACK_OFFSET: u32 = 32;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Virtio features offered for an export.
pub fn device_features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    }
    f
}

/// vhost-user protocol features: what QEMU, cloud-hypervisor and libblkio need. BACKEND_REQ
/// gives the backend a channel to the frontend, on which a capacity change is announced
/// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG; the frontend acks it when REPLY_ACK is on).
/// LOG_SHMFD (with VHOST_F_LOG_ALL) lets QEMU migrate the guest (`dirty_log.rs`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        // Requests in flight survive a backend restart (inflight.rs).
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Whether the driver acked `VIRTIO_BLK_F_FLUSH`: without it the device must write through.
pub fn flush_negotiated(acked: u64) -> bool {
    acked & bit(VIRTIO_BLK_F_FLUSH) != 0
}

/// The fields of `struct virtio_blk_config` this device fills.
#[derive(Clone, Copy, Debug)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub num_queues: u16,
    pub writeback: bool,
}

impl BlkConfig {
    /// The little-endian layout of the virtio 1.2 specification, section 5.2.4.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            if let Some(dst) = b.get_mut(offset..offset + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16: geometry is not offered.
        put(20, &BLK_SIZE.to_le_bytes());
        put(24, &[PHYSICAL_BLOCK_EXP, 0]);
        put(26, &MIN_IO_SECTORS.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        put(32, &[u8::from(self.writeback), 0]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_RANGE_SECTORS.to_le_bytes());
        put(40, &MAX_RANGE_SEGMENTS.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        put(48, &MAX_RANGE_SECTORS.to_le_bytes());
        put(52, &MAX_RANGE_SEGMENTS.to_le_bytes());
        put(56, &[1]);
        b
    }

    /// Exactly `size` bytes from `offset`; bytes past the structure read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        (offset..offset.saturating_add(size))
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_read_answers_exactly_the_size_asked() {
        let cfg = BlkConfig {
            capacity_sectors: 0x1122,
            seg_max: 254,
            num_queues: 2,
            writeback: true,
        };
        assert_eq!(cfg.read(0, 8), 0x1122u64.to_le_bytes().to_vec());
        assert_eq!(cfg.read(0, 256).len(), 256);
        assert_eq!(cfg.read(34, 2), vec![2, 0]);
        assert_eq!(cfg.read(WRITEBACK_OFFSET, 1), vec![1]);
    }

    #[test]
    fn range_limits_are_non_zero() {
        let b = BlkConfig {
            capacity_sectors: 8,
            seg_max: 1,
            num_queues: 1,
            writeback: false,
        }
        .to_bytes();
        for off in [36usize, 40, 48, 52] {
            let v = u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
            assert_ne!(v, 0, "limit at offset {off} is zero");
        }
        assert_eq!(MAX_RANGE_SECTORS % DISCARD_ALIGNMENT_SECTORS, 0);
    }

    #[test]
    fn size_max_is_advertised_and_seg_max_leaves_room_for_header_and_status() {
        let b = BlkConfig {
            capacity_sectors: 8,
            seg_max: seg_max(256),
            num_queues: 1,
            writeback: false,
        }
        .to_bytes();
        let word = |off: usize| u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
        assert_eq!(word(8), SIZE_MAX);
        assert_eq!(word(12), 254);
        assert_ne!(device_features(false) & bit(VIRTIO_BLK_F_SIZE_MAX), 0);
        assert_eq!(seg_max(1024), SEG_MAX_CAP);
        assert_eq!((seg_max(1), seg_max(2), seg_max(4)), (1, 1, 2));
    }

    #[test]
    fn no_queue_size_allows_more_than_the_largest_request() {
        for shift in 0..=15 {
            let limits = RequestLimits::for_queue(1 << shift);
            assert!(limits.max_transfer() <= MAX_TRANSFER);
            assert!(limits.seg_max >= 1);
            assert!(limits.max_descriptors >= limits.seg_max + 2);
            assert!(limits.max_descriptors >= 1 << shift.min(10));
        }
        assert_eq!(RequestLimits::for_queue(u16::MAX).seg_max, SEG_MAX_CAP);
    }

    #[test]
    fn read_only_exports_offer_ro() {
        assert_ne!(device_features(true) & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(device_features(false) & bit(VIRTIO_BLK_F_RO), 0);
    }
}
