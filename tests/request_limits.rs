//! Requests past the limits a vhost-user-blk export advertises (`seg_max`, `size_max`, and the
//! range counts of DISCARD and WRITE_ZEROES) get an error status written and a used length of
//! one (the status byte), the same on every kind of export, and the queue goes on serving.
//! Requests at the limits complete.
//!
//! Each export is served by a `thinblk serve` child process (one per test) and driven by the
//! hand-written driver in `frontend`, which builds chains no guest driver would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::path::{Path, PathBuf};

use common::{pattern, Daemon};
use frontend::{r, w, Desc, Used, Vm, QUEUE_SIZE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Large enough that even the ~4 GiB requests lie within the disk, so only the limits can
/// refuse them (all exports are sparse or virtual).
const DISK: u64 = 8 << 30;
/// What the export advertises for the frontend's queue size (256): the queue less header and
/// status, and 2 MiB per segment.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const SIZE_MAX: u32 = 2 << 20;
/// max_discard_seg and max_write_zeroes_seg.
const RANGES_MAX: usize = 32;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// What an untouched status byte holds.
const NOT_WRITTEN: u8 = 0xFF;

/// One export of `DISK` bytes in a `thinblk serve` child process.
///
/// Field order matters: the daemon stops before the scratch directory (and the socket in it)
/// goes. A test that fails kills the daemon with SIGKILL instead of SIGTERM, since a worker
/// stuck on a request (the bug this file tests for) keeps it from exiting.
struct Served {
    daemon: Option<Daemon>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if std::thread::panicking() {
                d.kill9();
            }
        }
    }
}

fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// Serves an export of `kind` ("null", "raw", "thin" or "cow").
fn serve(kind: &str) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let socket = d.join("disk.sock");
    let sock = socket.display();
    let mut args: Vec<String> = Vec::new();
    let export = match kind {
        "null" => format!("null={DISK},socket={sock}"),
        "raw" => {
            sparse_file(&d.join("disk.raw"), DISK);
            format!("raw={},socket={sock}", d.join("disk.raw").display())
        }
        "thin" => {
            args.extend(
                ["--dir", &d.display().to_string(), "--metadata-size", "16M"].map(String::from),
            );
            args.extend(["--data-size", "256M"].map(String::from));
            format!("name=vm,size={DISK},socket={sock}")
        }
        "cow" => {
            sparse_file(&d.join("origin.raw"), DISK);
            format!(
                "cow={},store={},chunk-size=16K,socket={sock}",
                d.join("origin.raw").display(),
                d.join("snap.cow").display()
            )
        }
        _ => panic!("no export kind {kind}"),
    };
    args.extend(["--export".to_string(), export]);
    let daemon = Daemon::start(&args, &[&socket]);
    Served {
        daemon: Some(daemon),
        socket,
        _dir: dir,
    }
}

/// A 16-byte request header in fresh guest memory.
fn header(vm: &mut Vm, kind: u32, sector: u64) -> u64 {
    let at = vm.alloc(16);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    vm.put(at, &h);
    at
}

/// Header, `data`, status as one indirect table (the only way past the queue size), on queue
/// 0. Returns the status byte and the used element.
fn request(vm: &mut Vm, kind: u32, sector: u64, data: &[Desc]) -> (u8, Used) {
    let h = header(vm, kind, sector);
    let st = vm.alloc(1);
    vm.put(st, &[NOT_WRITTEN]);
    let mut chain = vec![r(h, 16)];
    chain.extend_from_slice(data);
    chain.push(w(st, 1));
    let head = vm.add_indirect(0, &chain);
    vm.kick(0);
    let used = vm.wait_used(0, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].id, u32::from(head), "used id is not the head");
    (vm.get(st, 1)[0], used[0])
}

/// DISCARD / WRITE_ZEROES ranges: `n` ranges of 8 sectors each, one after another.
fn ranges(vm: &mut Vm, n: usize) -> Desc {
    let mut bytes = Vec::new();
    for i in 0..n as u64 {
        bytes.extend_from_slice(&(i * 8).to_le_bytes());
        bytes.extend_from_slice(&8u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
    }
    let at = vm.alloc(bytes.len() as u64);
    vm.put(at, &bytes);
    r(at, bytes.len() as u32)
}

/// Writes a pattern and reads it back: the queue still serves ordinary requests. (A null
/// export drops what is written and reads zeros.)
fn round_trip(vm: &mut Vm, kind: &str, seed: u64, after: &str) {
    let data = pattern(seed, 4096, 4096);
    let buf = vm.alloc(4096);
    vm.put(buf, &data);
    let (status, used) = request(vm, VIRTIO_BLK_T_OUT, 8, &[r(buf, 4096)]);
    assert_eq!((status, used.len), (OK, 1), "a write after {after}");
    let back = vm.alloc(4096);
    let (status, used) = request(vm, VIRTIO_BLK_T_IN, 8, &[w(back, 4096)]);
    assert_eq!((status, used.len), (OK, 4097), "a read after {after}");
    let want = if kind == "null" { vec![0; 4096] } else { data };
    assert!(vm.get(back, 4096) == want, "read back after {after}");
}

/// The limits every export advertises, whatever its kind.
fn advertised(export: &str) {
    let served = serve(export);
    let mut vm = Vm::connect(&served.socket, 1);
    let features = vm.negotiated.device_features;
    assert_ne!(
        features & (1 << VIRTIO_BLK_F_SIZE_MAX),
        0,
        "SIZE_MAX offered"
    );
    assert_ne!(features & (1 << VIRTIO_BLK_F_SEG_MAX), 0, "SEG_MAX offered");
    let config = vm.config(8, 8);
    let word = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    assert_eq!((word(0), word(4)), (SIZE_MAX, SEG_MAX), "size_max, seg_max");
}

/// A request past the limits.
#[derive(Clone, Copy, Debug)]
enum Past {
    /// ~4.1 GiB in 1025 descriptors of 4 MiB: past 2^32 bytes.
    Read1025x4M,
    /// ~4 GiB in 1022 descriptors of 4 MiB: past seg_max and size_max.
    Read1022x4M,
    /// 2 MiB in 4096 descriptors of 512 bytes: past seg_max.
    Write4096x512,
    /// seg_max + 1 segments of 512 bytes.
    WriteSegMaxPlusOne,
    /// One segment of size_max + 512 bytes.
    ReadPastSizeMax,
    /// A small segment, then one past size_max.
    WriteOnePastSizeMax,
    /// max_discard_seg + 1 ranges.
    Discard33,
    /// max_write_zeroes_seg + 1 ranges.
    WriteZeroes33,
}

impl Past {
    /// The request type and data descriptors; every data descriptor may point at the same
    /// buffer `big` (4 MiB, all the test guest can spare): the limits decide, not memory.
    fn request(self, vm: &mut Vm, big: u64) -> (u32, Vec<Desc>) {
        match self {
            Past::Read1025x4M => (VIRTIO_BLK_T_IN, vec![w(big, 4 << 20); 1025]),
            Past::Read1022x4M => (VIRTIO_BLK_T_IN, vec![w(big, 4 << 20); 1022]),
            Past::Write4096x512 => (VIRTIO_BLK_T_OUT, vec![r(big, 512); 4096]),
            Past::WriteSegMaxPlusOne => (VIRTIO_BLK_T_OUT, vec![r(big, 512); SEG_MAX as usize + 1]),
            Past::ReadPastSizeMax => (VIRTIO_BLK_T_IN, vec![w(big, SIZE_MAX + 512)]),
            Past::WriteOnePastSizeMax => {
                (VIRTIO_BLK_T_OUT, vec![r(big, 512), r(big, SIZE_MAX + 512)])
            }
            Past::Discard33 => (VIRTIO_BLK_T_DISCARD, vec![ranges(vm, RANGES_MAX + 1)]),
            Past::WriteZeroes33 => (VIRTIO_BLK_T_WRITE_ZEROES, vec![ranges(vm, RANGES_MAX + 1)]),
        }
    }
}

/// `past` gets IOERR written and a used length of 1, and the queue serves what follows.
fn refused(export: &str, past: Past) {
    let served = serve(export);
    let mut vm = Vm::connect(&served.socket, 1);
    let big = vm.alloc(4 << 20);
    let (op, data) = past.request(&mut vm, big);
    let (status, used) = request(&mut vm, op, 0, &data);
    assert_eq!(status, IOERR, "{past:?} on {export}: status");
    assert_eq!(
        used.len, 1,
        "{past:?} on {export}: used length (the status byte only)"
    );
    round_trip(&mut vm, export, data.len() as u64, &format!("{past:?}"));
}

/// Requests at the limits complete: seg_max segments of size_max (508 MiB) read in one
/// request, seg_max small segments written, and max_write_zeroes_seg ranges zeroed.
fn served_at_the_limits(export: &str) {
    let served = serve(export);
    let mut vm = Vm::connect(&served.socket, 1);
    let big = vm.alloc(4 << 20);
    let most = vec![w(big, SIZE_MAX); SEG_MAX as usize];
    let (status, used) = request(&mut vm, VIRTIO_BLK_T_IN, 0, &most);
    assert_eq!(status, OK, "a read of seg_max segments of size_max");
    assert_eq!(used.len, SEG_MAX * SIZE_MAX + 1, "its used length");
    let data = pattern(7, 0, SEG_MAX as usize * 512);
    let src = vm.alloc(data.len() as u64);
    vm.put(src, &data);
    let pieces: Vec<Desc> = (0..u64::from(SEG_MAX))
        .map(|i| r(src + i * 512, 512))
        .collect();
    let (status, used) = request(&mut vm, VIRTIO_BLK_T_OUT, 2048, &pieces);
    assert_eq!((status, used.len), (OK, 1), "a write of seg_max segments");
    let back = vm.alloc(data.len() as u64);
    let (status, _) = request(
        &mut vm,
        VIRTIO_BLK_T_IN,
        2048,
        &[w(back, data.len() as u32)],
    );
    assert_eq!(status, OK);
    let want = if export == "null" {
        vec![0; data.len()]
    } else {
        data
    };
    assert!(
        vm.get(back, want.len()) == want,
        "seg_max segments read back"
    );
    let list = ranges(&mut vm, RANGES_MAX);
    let (status, used) = request(&mut vm, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[list]);
    assert_eq!(
        (status, used.len),
        (OK, 1),
        "write zeroes of max_write_zeroes_seg ranges"
    );
}

/// One module per kind of export, each with one test per request past the limits.
macro_rules! every_export {
    ($($export:ident),*) => {$(
        mod $export {
            use super::*;

            fn export() -> &'static str {
                stringify!($export)
            }

            #[test]
            fn advertises_seg_max_and_size_max() {
                advertised(export());
            }

            #[test]
            fn serves_requests_at_the_limits() {
                served_at_the_limits(export());
            }

            #[test]
            fn refuses_a_read_of_1025_descriptors_of_4_mib() {
                refused(export(), Past::Read1025x4M);
            }

            #[test]
            fn refuses_a_read_of_1022_descriptors_of_4_mib() {
                refused(export(), Past::Read1022x4M);
            }

            #[test]
            fn refuses_a_write_of_4096_descriptors_of_512_bytes() {
                refused(export(), Past::Write4096x512);
            }

            #[test]
            fn refuses_a_write_of_seg_max_plus_one_segments() {
                refused(export(), Past::WriteSegMaxPlusOne);
            }

            #[test]
            fn refuses_a_read_segment_past_size_max() {
                refused(export(), Past::ReadPastSizeMax);
            }

            #[test]
            fn refuses_a_write_segment_past_size_max() {
                refused(export(), Past::WriteOnePastSizeMax);
            }

            #[test]
            fn refuses_a_discard_of_33_ranges() {
                refused(export(), Past::Discard33);
            }

            #[test]
            fn refuses_write_zeroes_of_33_ranges() {
                refused(export(), Past::WriteZeroes33);
            }
        }
    )*};
}

every_export!(null, raw, thin, cow);
