//! Turning a descriptor chain into a block request, trusting nothing the guest wrote.
//!
//! A chain is device-readable buffers followed by device-writable ones. The first 16 readable
//! bytes are the header, the last writable byte is the status, and what lies between is data,
//! however the driver chose to cut it into descriptors (the specification forbids relying on
//! any particular framing).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

const HEADER_LEN: u64 = 16;

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
    pub data: Vec<Segment>,
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

fn segments(descs: &[Desc]) -> Vec<Segment> {
    descs
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: GuestAddress(d.addr),
            len: u64::from(d.len),
        })
        .collect()
}

/// Splits the first `n` bytes off `segs`; `None` if they hold fewer than `n`.
fn split_front(segs: &[Segment], mut n: u64) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut front = Vec::new();
    let mut rest = Vec::new();
    for s in segs {
        if n == 0 {
            rest.push(*s);
        } else if s.len <= n {
            front.push(*s);
            n -= s.len;
        } else {
            front.push(Segment {
                addr: s.addr,
                len: n,
            });
            rest.push(Segment {
                addr: s.addr.checked_add(n)?,
                len: s.len - n,
            });
            n = 0;
        }
    }
    (n == 0).then_some((front, rest))
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

/// Frames a chain into a request.
pub fn parse(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<Request, Rejection> {
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
    let mut writable = segments(writable);
    if let Some(tail) = writable.last_mut() {
        tail.len -= 1;
        if tail.len == 0 {
            writable.pop();
        }
    }

    let (header_segs, readable) = split_front(&segments(readable), HEADER_LEN).ok_or(
        Rejection::ioerr(status, "chain too short for a request header"),
    )?;
    let header = gather(mem, &header_segs, HEADER_LEN)
        .ok_or(Rejection::ioerr(status, "request header is not readable"))?;
    let word = |range: std::ops::Range<usize>| header.get(range).unwrap_or(&[]).to_vec();
    let kind = u32::from_le_bytes(word(0..4).try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(word(8..16).try_into().unwrap_or_default());

    let op = match kind {
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
    };
    let data = match op {
        Op::Read | Op::GetId if readable.is_empty() => writable,
        Op::Write | Op::Discard | Op::WriteZeroes if writable.is_empty() => readable,
        Op::Flush if readable.is_empty() && writable.is_empty() => Vec::new(),
        _ => return Err(Rejection::ioerr(status, "data buffers point the wrong way")),
    };
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
        let r = parse(
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
            r.data,
            vec![Segment {
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
        let r = parse(
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
            r.data,
            vec![Segment {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );

        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        let r = parse(&m, &[d(0x100, 16, false), d(0x1000, 513, true)]).unwrap();
        assert_eq!(
            r.data,
            vec![Segment {
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
        let e = parse(&m, &[d(0x100, 16, false), d(0x200, 1, false)]).unwrap_err();
        assert_eq!(e.status, None);
        assert_eq!(parse(&m, &[]).unwrap_err().status, None);
    }

    #[test]
    fn a_status_outside_guest_memory_is_never_written() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_FLUSH, 0);
        let e = parse(&m, &[d(0x100, 16, false), d(0x10_0000, 1, true)]).unwrap_err();
        assert_eq!(e.status, None);
    }

    #[test]
    fn short_or_unreadable_headers_get_ioerr() {
        let m = mem();
        let e = parse(&m, &[d(0x100, 8, false), d(0x200, 1, true)]).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (Some(GuestAddress(0x200)), VIRTIO_BLK_S_IOERR as u8)
        );
        let e = parse(&m, &[d(0xffff_0000, 16, false), d(0x200, 1, true)]).unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn unknown_types_are_unsupported_and_wrong_directions_are_errors() {
        let m = mem();
        header(&m, 0x100, 99, 0);
        let e = parse(&m, &[d(0x100, 16, false), d(0x200, 1, true)]).unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_UNSUPP as u8);
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        let e = parse(
            &m,
            &[
                d(0x100, 16, false),
                d(0x1000, 512, false),
                d(0x200, 1, true),
            ],
        )
        .unwrap_err();
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
        let e = parse(
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
}
