//! Walking a descriptor chain out of a split virtqueue's descriptor table, for framing.
//!
//! virtio-queue's own chain iterator stops without a word when a chain passes 2^32 bytes, and
//! yields whatever prefix it read of a chain that loops or leaves its table: framing would take
//! the prefix's last descriptor for the status byte, and write a status into a data buffer
//! while the real status byte stays unwritten. This walker reads the whole chain under the
//! same rules (a direct chain at most the queue size long, one indirect table of at most
//! 65535 descriptors, no indirect table inside another) and says when a chain is broken,
//! so a chain is either whole or has no status at all. It keeps at most
//! `limits.max_descriptors` descriptors and the last one: a longer chain is rejected by
//! [`parse`] with its status written where the guest put it, without holding the rest.

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::dirty_log::{GuestLog, GuestMemoryMmap};

use super::config::RequestLimits;
use super::request::{parse, Desc, Rejection, Request};

/// Bytes of one descriptor in a table (`struct virtq_desc`).
const DESC_LEN: u64 = 16;

/// A split virtqueue's descriptor table: where it is and how many descriptors it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescTable {
    pub addr: GuestAddress,
    pub size: u16,
}

/// The descriptors a chain is framed from: the first ones, and the last one if it is not
/// among them. Inline room for the usual header, data and status: no allocation per request
/// unless the chain is long.
pub type Descs = SmallVec<[Desc; 8]>;

/// One descriptor as the table holds it.
struct Raw {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Raw {
    fn has(&self, flag: u32) -> bool {
        u32::from(self.flags) & flag != 0
    }
}

fn read_desc(mem: &GuestMemoryMmap, table: DescTable, index: u16) -> Option<Raw> {
    let at = table
        .addr
        .0
        .checked_add(u64::from(index) * DESC_LEN)
        .map(GuestAddress)?;
    let mut b = [0u8; DESC_LEN as usize];
    // One region lookup and a plain copy when the descriptor lies in one region, as it
    // always does in a table the frontend laid out itself; `read_slice` walks regions
    // through a generic iterator that costs several times that per descriptor.
    match mem.get_slice(at, b.len()) {
        Ok(slice) => {
            if slice.copy_to(&mut b[..]) != b.len() {
                return None;
            }
        }
        Err(_) => mem.read_slice(&mut b, at).ok()?,
    }
    Some(decode(b))
}

/// The whole of `table` as one host slice, when it lies in one region (as a table the
/// frontend laid out always does): a chain's descriptors are then read from it without a
/// region lookup each.
fn table_view(
    mem: &GuestMemoryMmap,
    table: DescTable,
) -> Option<vm_memory::VolatileSlice<'_, vm_memory::bitmap::BS<'_, GuestLog>>> {
    let len = usize::from(table.size) * DESC_LEN as usize;
    mem.get_slice(table.addr, len).ok()
}

/// Descriptor `index` of a table seen through [`table_view`].
fn read_viewed(
    view: &vm_memory::VolatileSlice<'_, vm_memory::bitmap::BS<'_, GuestLog>>,
    index: u16,
) -> Option<Raw> {
    let at = usize::from(index) * DESC_LEN as usize;
    let slice = view.subslice(at, DESC_LEN as usize).ok()?;
    let mut b = [0u8; DESC_LEN as usize];
    (slice.copy_to(&mut b[..]) == b.len()).then(|| decode(b))
}

fn decode(b: [u8; DESC_LEN as usize]) -> Raw {
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b;
    Raw {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    }
}

fn broken(reason: &'static str) -> Rejection {
    Rejection {
        status: None,
        code: VIRTIO_BLK_S_IOERR as u8,
        reason,
    }
}

/// Reads chain `head` of `table`; a broken chain (a loop or a chain longer than its table, an
/// index past the table, an unreadable descriptor, a malformed or nested indirect table) is
/// rejected with nowhere to write a status.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
    limits: &RequestLimits,
) -> Result<Descs, Rejection> {
    let mut out = Descs::new();
    walk_into(mem, table, head, limits, &mut out)?;
    Ok(out)
}

/// [`walk`] into the caller's list, which must be empty: framing walks every request, and a
/// list of descriptors returned by value is copied (about 200 bytes) on the way out.
fn walk_into(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
    limits: &RequestLimits,
    out: &mut Descs,
) -> Result<(), Rejection> {
    let keep = limits.max_descriptors as usize;
    let mut last = None;
    let (mut table, mut index, mut ttl, mut indirect) = (table, head, table.size, false);
    let mut view = table_view(mem, table);
    loop {
        if index >= table.size {
            return Err(broken("descriptor index past its table"));
        }
        let d = match &view {
            Some(v) => read_viewed(v, index),
            None => read_desc(mem, table, index),
        };
        let d = d.ok_or(broken("descriptor outside guest memory"))?;
        if d.has(VRING_DESC_F_INDIRECT) {
            if indirect {
                return Err(broken("indirect table inside an indirect table"));
            }
            let entries = u64::from(d.len) / DESC_LEN;
            if u64::from(d.len) % DESC_LEN != 0 || entries == 0 {
                return Err(broken("indirect table is not whole descriptors"));
            }
            let size = u16::try_from(entries).map_err(|_| broken("indirect table too long"))?;
            (table, index, ttl, indirect) = (
                DescTable {
                    addr: GuestAddress(d.addr),
                    size,
                },
                0,
                size,
                true,
            );
            view = table_view(mem, table);
            continue;
        }
        let desc = Desc {
            addr: d.addr,
            len: d.len,
            writable: d.has(VRING_DESC_F_WRITE),
        };
        if out.len() < keep {
            out.push(desc);
        } else {
            last = Some(desc);
        }
        if !d.has(VRING_DESC_F_NEXT) {
            break;
        }
        // Every descriptor of a table at most once: more is a loop.
        ttl -= 1;
        if ttl == 0 {
            return Err(broken("descriptor chain loops or outgrows its table"));
        }
        index = d.next;
    }
    out.extend(last);
    Ok(())
}

/// Walks chain `head` and frames it into a request within `limits`.
pub fn frame(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
    limits: &RequestLimits,
) -> Result<Request, Rejection> {
    let mut descs = Descs::new();
    walk_into(mem, table, head, limits, &mut descs)?;
    parse(mem, &descs, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::request::Op;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

    const TABLE: DescTable = DescTable {
        addr: GuestAddress(0x1000),
        size: 8,
    };
    const LIMITS: RequestLimits = RequestLimits::for_queue(8);
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A descriptor as the driver writes it: address, length, flags, next.
    type RawDesc = (u64, u32, u16, u16);

    fn put(mem: &GuestMemoryMmap, table: u64, index: u16, d: RawDesc) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&d.0.to_le_bytes());
        b[8..12].copy_from_slice(&d.1.to_le_bytes());
        b[12..14].copy_from_slice(&d.2.to_le_bytes());
        b[14..].copy_from_slice(&d.3.to_le_bytes());
        mem.write_slice(&b, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    fn read_header(mem: &GuestMemoryMmap) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x100)).unwrap();
    }

    #[test]
    fn a_direct_chain_and_an_indirect_one_frame_alike() {
        let m = mem();
        read_header(&m);
        put(&m, 0x1000, 3, (0x100, 16, NEXT, 5));
        put(&m, 0x1000, 5, (0x4000, 512, NEXT | WRITE, 0));
        put(&m, 0x1000, 0, (0x300, 1, WRITE, 0));
        let direct = frame(&m, TABLE, 3, &LIMITS).unwrap();
        assert_eq!((direct.op, direct.data.len()), (Op::Read, 1));
        put(&m, 0x2000, 0, (0x100, 16, NEXT, 1));
        put(&m, 0x2000, 1, (0x4000, 512, NEXT | WRITE, 2));
        put(&m, 0x2000, 2, (0x300, 1, WRITE, 0));
        put(&m, 0x1000, 1, (0x2000, 48, INDIRECT, 0));
        assert_eq!(frame(&m, TABLE, 1, &LIMITS).unwrap(), direct);
    }

    #[test]
    fn broken_chains_have_no_status() {
        let m = mem();
        read_header(&m);
        let cases: [(&str, RawDesc); 5] = [
            ("a loop", (0x100, 16, NEXT, 0)),
            ("next past the table", (0x100, 16, NEXT, 8)),
            (
                "indirect table of 2.5 descriptors",
                (0x2000, 40, INDIRECT, 0),
            ),
            ("empty indirect table", (0x2000, 0, INDIRECT, 0)),
            (
                "indirect table outside memory",
                (0x20_0000, 32, INDIRECT, 0),
            ),
        ];
        for (what, d) in cases {
            put(&m, 0x1000, 0, d);
            let e = walk(&m, TABLE, 0, &LIMITS).unwrap_err();
            assert_eq!(e.status, None, "{what}");
        }
        put(&m, 0x2000, 0, (0x3000, 16, INDIRECT, 0));
        put(&m, 0x1000, 0, (0x2000, 16, INDIRECT, 0));
        assert_eq!(walk(&m, TABLE, 0, &LIMITS).unwrap_err().status, None);
        assert!(walk(&m, TABLE, 9, &LIMITS).is_err(), "head past the table");
    }

    #[test]
    fn a_chain_longer_than_the_limit_keeps_its_real_status() {
        let m = mem();
        read_header(&m);
        // 2000 descriptors of 4 MiB: past 2^32 bytes, and far past the queue's 8.
        let n: u16 = 2002;
        put(&m, 0x2_0000, 0, (0x100, 16, NEXT, 1));
        for i in 1..n - 1 {
            put(&m, 0x2_0000, i, (0x4000, 4 << 20, NEXT | WRITE, i + 1));
        }
        put(&m, 0x2_0000, n - 1, (0x300, 1, WRITE, 0));
        put(&m, 0x1000, 0, (0x2_0000, 16 * u32::from(n), INDIRECT, 0));
        let descs = walk(&m, TABLE, 0, &LIMITS).unwrap();
        assert_eq!(descs.len(), LIMITS.max_descriptors as usize + 1);
        assert_eq!(descs.last().map(|d| d.addr), Some(0x300));
        let e = frame(&m, TABLE, 0, &LIMITS).unwrap_err();
        assert_eq!(e.status, Some(GuestAddress(0x300)));
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
    }
}
