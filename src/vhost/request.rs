//! Turning a descriptor chain into a block request, trusting nothing the guest wrote.
//!
//! A chain is device-readable buffers followed by device-writable ones. The first 16 readable
//! bytes are the header, the last writable byte is the status, and what lies between is data,
//! however the driver chose to cut it into descriptors (the specification forbids relying on
//! any particular framing).
//!
//! This is also the one place a request is held to the limits the device advertised
//! ([`RequestLimits`]: `seg_max`, `size_max`, and the range counts of DISCARD and
//! WRITE_ZEROES): a request past them is answered with an error status here, the same whatever
//! the device behind the export, and no device ever sees it.

use smallvec::SmallVec;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::dirty_log::GuestMemoryMmap;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::config::{RequestLimits, MAX_RANGE_SEGMENTS};

const HEADER_LEN: u64 = 16;
/// Bytes of one DISCARD or WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_SEGMENT_LEN: u64 = 16;

/// One descriptor as the chain walker found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A contiguous piece of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// A request's data buffers. Drivers hand over one to three for ordinary transfers, so these
/// live inline and framing allocates nothing; long scattered transfers spill to the heap.
pub type Segments = SmallVec<[Segment; 4]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A well-framed request; its ranges are checked against the device when it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub sector: u64,
    pub data: Segments,
    pub status: GuestAddress,
}

/// A chain that cannot run. With a status address the guest is told `code`; without one
/// there is nowhere to put a status and the chain is only returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: Option<GuestAddress>,
    pub code: u8,
    pub reason: &'static str,
}

impl Rejection {
    fn ioerr(status: GuestAddress, reason: &'static str) -> Self {
        Rejection {
            status: Some(status),
            code: VIRTIO_BLK_S_IOERR as u8,
            reason,
        }
    }
}

/// Where the readable data begins: at descriptor `index`, `skip` bytes into it.
struct HeaderEnd {
    index: usize,
    skip: u64,
}

/// Finds the end of the header in the readable descriptors; `None` if they hold fewer than
/// its 16 bytes, or if the data after it would start past the end of the address space.
fn header_end(readable: &[Desc]) -> Option<HeaderEnd> {
    let mut need = HEADER_LEN;
    for (index, d) in readable.iter().enumerate() {
        let len = u64::from(d.len);
        if len < need {
            need -= len;
            continue;
        }
        if len == need {
            return Some(HeaderEnd {
                index: index + 1,
                skip: 0,
            });
        }
        // Data beginning past the top of the address space cannot be described.
        GuestAddress(d.addr).checked_add(need)?;
        return Some(HeaderEnd { index, skip: need });
    }
    None
}

/// Copies the header out of the leading readable descriptors (already known to hold it).
fn read_header(mem: &GuestMemoryMmap, readable: &[Desc]) -> Option<[u8; HEADER_LEN as usize]> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut pos = 0usize;
    for d in readable {
        if pos == header.len() {
            break;
        }
        let take = usize::try_from(d.len)
            .unwrap_or(usize::MAX)
            .min(header.len() - pos);
        if take == 0 {
            continue;
        }
        let buf = header.get_mut(pos..pos + take)?;
        let addr = GuestAddress(d.addr);
        // One lookup and a plain copy when the piece lies in one region, as it nearly always
        // does; the general path walks regions.
        match mem.get_slice(addr, take) {
            Ok(slice) => {
                if slice.copy_to(buf) != take {
                    return None;
                }
            }
            Err(_) => mem.read_slice(buf, addr).ok()?,
        }
        pos += take;
    }
    Some(header)
}

/// The data buffers after the header, without empty descriptors.
fn readable_data(readable: &[Desc], end: &HeaderEnd) -> Segments {
    let rest = readable.get(end.index..).unwrap_or(&[]);
    let mut out = Segments::new();
    for (i, d) in rest.iter().enumerate() {
        let skip = if i == 0 { end.skip } else { 0 };
        let len = u64::from(d.len).saturating_sub(skip);
        if len > 0 {
            // header_end checked that this cannot overflow.
            let addr = GuestAddress(d.addr.wrapping_add(skip));
            out.push(Segment { addr, len });
        }
    }
    out
}

/// The data buffers before the status byte, without empty descriptors.
fn writable_data(writable: &[Desc]) -> Segments {
    let last = writable.len().saturating_sub(1);
    let mut out = Segments::new();
    for (i, d) in writable.iter().enumerate() {
        let len = u64::from(d.len).saturating_sub(u64::from(i == last));
        if len > 0 {
            out.push(Segment {
                addr: GuestAddress(d.addr),
                len,
            });
        }
    }
    out
}

/// Reads `segs` into one buffer of at most `max` bytes.
pub fn gather(mem: &GuestMemoryMmap, segs: &[Segment], max: u64) -> Option<Vec<u8>> {
    let total = segs.iter().try_fold(0u64, |a, s| a.checked_add(s.len))?;
    if total > max {
        return None;
    }
    let mut out = vec![0u8; usize::try_from(total).ok()?];
    let mut pos = 0usize;
    for s in segs {
        let n = usize::try_from(s.len).ok()?;
        mem.read_slice(out.get_mut(pos..pos + n)?, s.addr).ok()?;
        pos += n;
    }
    Some(out)
}

/// The status byte's address and the chain split into its device-readable and
/// device-writable descriptors.
fn split_chain<'a>(
    mem: &GuestMemoryMmap,
    descs: &'a [Desc],
) -> Result<(GuestAddress, &'a [Desc], &'a [Desc]), Rejection> {
    let no_status = |reason| Rejection {
        status: None,
        code: VIRTIO_BLK_S_IOERR as u8,
        reason,
    };
    let last = descs.last().ok_or(no_status("empty descriptor chain"))?;
    if !last.writable || last.len == 0 {
        return Err(no_status("status descriptor is not device-writable"));
    }
    let status = GuestAddress(last.addr)
        .checked_add(u64::from(last.len) - 1)
        .filter(|a| mem.address_in_range(*a))
        .ok_or(no_status("status byte lies outside guest memory"))?;

    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    if writable.iter().any(|d| !d.writable) {
        return Err(Rejection::ioerr(
            status,
            "readable descriptor after a writable one",
        ));
    }
    Ok((status, readable, writable))
}

/// The operation a request header's type field asks for.
fn op_of(kind: u32, status: GuestAddress) -> Result<Op, Rejection> {
    Ok(match kind {
        VIRTIO_BLK_T_IN => Op::Read,
        VIRTIO_BLK_T_OUT => Op::Write,
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => Op::GetId,
        VIRTIO_BLK_T_DISCARD => Op::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
        _ => {
            return Err(Rejection {
                status: Some(status),
                code: VIRTIO_BLK_S_UNSUPP as u8,
                reason: "unsupported request type",
            })
        }
    })
}

/// Why a request's data is past the device's limits, if it is.
fn past_limits(op: Op, data: &[Segment], limits: &RequestLimits) -> Option<&'static str> {
    if data.len() > limits.seg_max as usize {
        return Some("more data segments than seg_max");
    }
    if data.iter().any(|s| s.len > u64::from(limits.size_max)) {
        return Some("a data segment longer than size_max");
    }
    if matches!(op, Op::Discard | Op::WriteZeroes) {
        // Bounded by the checks above: at most seg_max * size_max bytes.
        let len: u64 = data.iter().map(|s| s.len).sum();
        let ranges = len / RANGE_SEGMENT_LEN;
        if !len.is_multiple_of(RANGE_SEGMENT_LEN)
            || ranges == 0
            || ranges > u64::from(MAX_RANGE_SEGMENTS)
        {
            return Some("range list is not 1 to max_discard_seg whole ranges");
        }
    }
    None
}

/// Frames a chain into a request within `limits`.
pub fn parse(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    limits: &RequestLimits,
) -> Result<Request, Rejection> {
    let (status, readable, writable) = split_chain(mem, descs)?;
    if descs.len() > limits.max_descriptors as usize {
        return Err(Rejection::ioerr(status, "chain longer than the queue"));
    }

    let end = header_end(readable).ok_or(Rejection::ioerr(
        status,
        "chain too short for a request header",
    ))?;
    let header = read_header(mem, readable)
        .ok_or(Rejection::ioerr(status, "request header is not readable"))?;
    let [k0, k1, k2, k3, _, _, _, _, sector @ ..] = header;
    let kind = u32::from_le_bytes([k0, k1, k2, k3]);
    let sector = u64::from_le_bytes(sector);

    let op = op_of(kind, status)?;
    // Bytes after the header or before the status byte are data, and only the side the
    // operation moves data on may hold any. (A descriptor the header ends inside always has
    // bytes left after it.)
    let has_readable = readable
        .get(end.index..)
        .unwrap_or(&[])
        .iter()
        .any(|d| d.len > 0);
    let has_writable = writable.iter().map(|d| u64::from(d.len)).sum::<u64>() > 1;
    let data = match op {
        Op::Read | Op::GetId if !has_readable => writable_data(writable),
        Op::Write | Op::Discard | Op::WriteZeroes if !has_writable => readable_data(readable, &end),
        Op::Flush if !has_readable && !has_writable => Segments::new(),
        _ => return Err(Rejection::ioerr(status, "data buffers point the wrong way")),
    };
    if let Some(reason) = past_limits(op, &data, limits) {
        return Err(Rejection::ioerr(status, reason));
    }
    Ok(Request {
        op,
        sector,
        data,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vhost::config::SIZE_MAX;

    /// The limits of a queue of 256, which the hand-made chains here are well within.
    const LIMITS: RequestLimits = RequestLimits::for_queue(256);

    fn framed(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<Request, Rejection> {
        parse(mem, descs, &LIMITS)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn d(addr: u64, len: u32, writable: bool) -> Desc {
        Desc {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn header_data_and_status_in_one_descriptor_each() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_IN, 7);
        let r = framed(
            &m,
            &[
                d(0x100, 16, false),
                d(0x1000, 4096, true),
                d(0x200, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.op, Op::Read);
        assert_eq!(r.sector, 7);
        assert_eq!(
            r.data.as_slice(),
            [Segment {
                addr: GuestAddress(0x1000),
                len: 4096
            }]
        );
        assert_eq!(r.status, GuestAddress(0x200));
    }

    #[test]
    fn header_split_across_descriptors_and_status_sharing_a_buffer_are_framed() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 3);
        let r = framed(
            &m,
            &[
                d(0x100, 10, false),
                d(0x10a, 6 + 512, false),
                d(0x300, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.op, Op::Write);
        assert_eq!(r.sector, 3);
        assert_eq!(
            r.data.as_slice(),
            [Segment {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );

        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        let r = framed(&m, &[d(0x100, 16, false), d(0x1000, 513, true)]).unwrap();
        assert_eq!(
            r.data.as_slice(),
            [Segment {
                addr: GuestAddress(0x1000),
                len: 512
            }]
        );
        assert_eq!(r.status, GuestAddress(0x1200));
    }

    #[test]
    fn a_chain_without_writable_status_has_nowhere_to_report() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        let e = framed(&m, &[d(0x100, 16, false), d(0x200, 1, false)]).unwrap_err();
        assert_eq!(e.status, None);
        assert_eq!(framed(&m, &[]).unwrap_err().status, None);
    }

    #[test]
    fn a_status_outside_guest_memory_is_never_written() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_FLUSH, 0);
        let e = framed(&m, &[d(0x100, 16, false), d(0x10_0000, 1, true)]).unwrap_err();
        assert_eq!(e.status, None);
    }

    #[test]
    fn short_or_unreadable_headers_get_ioerr() {
        let m = mem();
        let e = framed(&m, &[d(0x100, 8, false), d(0x200, 1, true)]).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (Some(GuestAddress(0x200)), VIRTIO_BLK_S_IOERR as u8)
        );
        let e = framed(&m, &[d(0xffff_0000, 16, false), d(0x200, 1, true)]).unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn unknown_types_are_unsupported_and_wrong_directions_are_errors() {
        let m = mem();
        header(&m, 0x100, 99, 0);
        let e = framed(&m, &[d(0x100, 16, false), d(0x200, 1, true)]).unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_UNSUPP as u8);
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        let e = framed(
            &m,
            &[
                d(0x100, 16, false),
                d(0x1000, 512, false),
                d(0x200, 1, true),
            ],
        )
        .unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
        let e = framed(
            &m,
            &[
                d(0x100, 16, false),
                d(0x1000, 512, true),
                d(0x300, 8, false),
                d(0x200, 1, true),
            ],
        )
        .unwrap_err();
        assert_eq!(e.reason, "readable descriptor after a writable one");
    }

    /// Header at 0x100, `data` (all one way), status at 0x200.
    fn chain_with(data: &[Desc]) -> Vec<Desc> {
        let mut c = vec![d(0x100, 16, false)];
        c.extend_from_slice(data);
        c.push(d(0x200, 1, true));
        c
    }

    fn ioerr_at_status(reason: &'static str) -> Rejection {
        Rejection::ioerr(GuestAddress(0x200), reason)
    }

    #[test]
    fn requests_past_seg_max_or_size_max_get_ioerr_at_framing() {
        let m = mem();
        let limits = RequestLimits::for_queue(256);
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        // The cases of issue 21: ~4.1 GiB in 1025 descriptors of 4 MiB, ~4 GiB in 1022 of them.
        for n in [1025, 1022] {
            let data = vec![d(0x1000, 4 << 20, true); n];
            let e = parse(&m, &chain_with(&data), &limits).unwrap_err();
            assert_eq!(e, ioerr_at_status("chain longer than the queue"));
        }
        let data = vec![d(0x1000, 4 << 20, true); 4];
        let e = parse(&m, &chain_with(&data), &limits).unwrap_err();
        assert_eq!(e, ioerr_at_status("a data segment longer than size_max"));
        // A 2 MiB write in 4096 descriptors of 512 bytes.
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 0);
        let data = vec![d(0x1000, 512, false); 4096];
        let e = parse(&m, &chain_with(&data), &limits).unwrap_err();
        assert_eq!(e, ioerr_at_status("chain longer than the queue"));
        // Within the queue, one segment past seg_max: the header shares its descriptor.
        let mut chain = vec![d(0x100, 16 + 512, false)];
        chain.extend(vec![d(0x1000, 512, false); 254]);
        chain.push(d(0x200, 1, true));
        assert_eq!(chain.len(), 256);
        let e = parse(&m, &chain, &limits).unwrap_err();
        assert_eq!(e, ioerr_at_status("more data segments than seg_max"));
    }

    #[test]
    fn requests_at_the_limits_are_framed() {
        let m = mem();
        let limits = RequestLimits::for_queue(256);
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 0);
        let most = vec![d(0x1000, SIZE_MAX, false); limits.seg_max as usize];
        let r = parse(&m, &chain_with(&most), &limits).unwrap();
        assert_eq!(r.data.len(), 254);
        let bytes: u64 = r.data.iter().map(|s| s.len).sum();
        assert_eq!(bytes, limits.max_transfer());
        // Empty descriptors are no segments; a header sharing its descriptor with data is.
        let mut chain = vec![d(0x100, 16 + 512, false), d(0x2000, 0, false)];
        chain.extend(vec![d(0x1000, 512, false); 253]);
        chain.push(d(0x200, 1, true));
        assert_eq!(chain.len(), 256);
        assert_eq!(parse(&m, &chain, &limits).unwrap().data.len(), 254);
        chain.insert(2, d(0x1000, 0, false));
        let e = parse(&m, &chain, &limits).unwrap_err();
        assert_eq!(e, ioerr_at_status("chain longer than the queue"));
    }

    #[test]
    fn range_requests_carry_one_to_max_discard_seg_whole_ranges() {
        let m = mem();
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            header(&m, 0x100, kind, 0);
            for (len, ok) in [(16, true), (16 * 32, true), (16 * 33, false), (24, false)] {
                let r = framed(&m, &chain_with(&[d(0x1000, len, false)]));
                assert_eq!(r.is_ok(), ok, "type {kind}, {len} bytes of ranges");
            }
            let e = framed(&m, &chain_with(&[])).unwrap_err();
            assert_eq!(
                e.code, VIRTIO_BLK_S_IOERR as u8,
                "type {kind} without ranges"
            );
        }
    }

    /// Framing as the specification states it, one list of byte ranges at a time, to hold
    /// the single-pass framing to.
    fn model(
        mem: &GuestMemoryMmap,
        descs: &[Desc],
        limits: &RequestLimits,
    ) -> Result<Request, Rejection> {
        // The status checks are shared; what the single pass replaced starts after them.
        let (status, readable, writable) = split_chain(mem, descs)?;
        if descs.len() as u64 > u64::from(limits.max_descriptors) {
            return Err(Rejection::ioerr(status, "chain longer than the queue"));
        }
        let segs = |ds: &[Desc]| -> Vec<Segment> {
            ds.iter()
                .filter(|d| d.len > 0)
                .map(|d| Segment {
                    addr: GuestAddress(d.addr),
                    len: u64::from(d.len),
                })
                .collect()
        };
        let mut out = segs(writable);
        if let Some(tail) = out.last_mut() {
            tail.len -= 1;
        }
        out.retain(|s| s.len > 0);
        let (mut head, mut data_in, mut need) = (Vec::new(), Vec::new(), HEADER_LEN);
        for s in segs(readable) {
            let take = s.len.min(need);
            if take > 0 {
                head.push(Segment { len: take, ..s });
            }
            if take < s.len {
                let short = Rejection::ioerr(status, "chain too short for a request header");
                let addr = s.addr.checked_add(take).ok_or(short)?;
                data_in.push(Segment {
                    addr,
                    len: s.len - take,
                });
            }
            need -= take;
        }
        if need > 0 {
            return Err(Rejection::ioerr(
                status,
                "chain too short for a request header",
            ));
        }
        let header = gather(mem, &head, HEADER_LEN)
            .ok_or(Rejection::ioerr(status, "request header is not readable"))?;
        let kind = u32::from_le_bytes(header[..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..].try_into().unwrap());
        let op = op_of(kind, status)?;
        let data = match op {
            Op::Read | Op::GetId if data_in.is_empty() => out,
            Op::Write | Op::Discard | Op::WriteZeroes if out.is_empty() => data_in,
            Op::Flush if data_in.is_empty() && out.is_empty() => Vec::new(),
            _ => return Err(Rejection::ioerr(status, "data buffers point the wrong way")),
        };
        // seg_max: the most segments; size_max: the longest one; a range request carries
        // between one and max_discard_seg (max_write_zeroes_seg) ranges of 16 bytes.
        if data.len() as u64 > u64::from(limits.seg_max) {
            return Err(Rejection::ioerr(status, "more data segments than seg_max"));
        }
        if data.iter().map(|s| s.len).max().unwrap_or(0) > u64::from(limits.size_max) {
            return Err(Rejection::ioerr(
                status,
                "a data segment longer than size_max",
            ));
        }
        let bytes: u128 = data.iter().map(|s| u128::from(s.len)).sum();
        let whole_ranges = bytes.is_multiple_of(16) && (16..=16 * 32).contains(&bytes);
        if matches!(op, Op::Discard | Op::WriteZeroes) && !whole_ranges {
            return Err(Rejection::ioerr(
                status,
                "range list is not 1 to max_discard_seg whole ranges",
            ));
        }
        Ok(Request {
            op,
            sector,
            data: data.into_iter().collect(),
            status,
        })
    }

    /// Two adjacent regions, a gap, and a small third; every 16 bytes start with a request
    /// type, so headers anywhere read as one of the known types or an unknown one.
    fn patterned_memory() -> GuestMemoryMmap {
        let ranges = [
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x3000), 0x1000),
        ];
        let m = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        for (start, len) in ranges {
            for at in (0..len as u64).step_by(16) {
                let kind = ((start.0 + at) / 16 % 15) as u32;
                header(&m, start.0 + at, kind, at);
            }
        }
        m
    }

    fn any_desc() -> impl proptest::strategy::Strategy<Value = Desc> {
        use proptest::prelude::*;
        let addr = prop_oneof![
            0u64..0x4200,
            (0u64..0x40).prop_map(|a| 0x1000 - a),
            (0u64..0x40).prop_map(|a| u64::MAX - a),
        ];
        let len = prop_oneof![0u32..40, 0u32..0x1100, Just(u32::MAX)];
        (addr, len, any::<bool>()).prop_map(|(addr, len, writable)| Desc {
            addr,
            len,
            writable,
        })
    }

    /// Mostly well-formed chains: a header cut in two (with data after it in the second
    /// piece), data buffers either way, a status buffer, and sometimes a stray descriptor.
    fn any_chain() -> impl proptest::strategy::Strategy<Value = Vec<Desc>> {
        use proptest::collection::vec;
        use proptest::prelude::*;
        let header_at = prop_oneof![0u64..0x200, 0x300u64..0x400].prop_map(|b| b * 16);
        let buf = || (0u64..0x4100, prop_oneof![Just(0u32), 1u32..0x300]);
        (
            header_at,
            0u32..=16,
            prop_oneof![Just(0u32), 0u32..32],
            vec(buf(), 0..3),
            vec(buf(), 0..3),
            (0u64..0x4100, 1u32..4),
            proptest::option::of((any_desc(), 0usize..8)),
        )
            .prop_map(|(at, cut, extra, ins, outs, status, stray)| {
                let mut c = vec![
                    d(at, cut, false),
                    d(at + u64::from(cut), 16 - cut + extra, false),
                ];
                c.extend(ins.iter().map(|&(a, n)| d(a, n, false)));
                c.extend(outs.iter().map(|&(a, n)| d(a, n, true)));
                c.push(d(status.0, status.1, true));
                if let Some((desc, at)) = stray {
                    c.insert(at.min(c.len()), desc);
                }
                c
            })
    }

    /// Limits small enough that the generated chains fall on both sides of them.
    fn any_limits() -> impl proptest::strategy::Strategy<Value = RequestLimits> {
        use proptest::prelude::*;
        (
            prop_oneof![3u32..9, Just(256)],
            prop_oneof![1u32..4, Just(254)],
            prop_oneof![Just(16u32), 1u32..0x300, Just(SIZE_MAX)],
        )
            .prop_map(|(max_descriptors, seg_max, size_max)| RequestLimits {
                max_descriptors,
                seg_max,
                size_max,
            })
    }

    proptest::proptest! {
        // Cheap cases, and the corner ones (a header at the top of the address space) are rare.
        #![proptest_config(proptest::test_runner::Config {
            cases: 4096,
            ..Default::default()
        })]
        #[test]
        fn framing_agrees_with_the_model(
            descs in proptest::prop_oneof![
                any_chain(),
                proptest::collection::vec(any_desc(), 0..7),
            ],
            limits in any_limits(),
        ) {
            let m = patterned_memory();
            proptest::prop_assert_eq!(parse(&m, &descs, &limits), model(&m, &descs, &limits));
        }
    }
}
