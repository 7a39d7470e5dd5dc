//! A descriptor chain and guest memory of the fuzzer's choosing, framed by
//! `vhost::request::parse` and, when it frames, run by `vhost::execute::complete` against a
//! memory disk.
//!
//! Input: flags (1 byte), descriptor count (1 byte, at most 32), then per descriptor its
//! address (u64), length (u32) and direction (1 byte, bit 0 = device-writable), then the
//! first guest RAM region's contents.

use super::{guest_memory, Input};
use thinblk::engine::memory::MemoryDevice;
use thinblk::vhost::config::RequestLimits;
use thinblk::vhost::execute::{complete, Target};
use thinblk::vhost::request::{parse, Desc};
use vm_memory::GuestMemoryBackend;

const DISK: u64 = 64 << 10;
/// A queue of 16: chains of up to 32 descriptors fall on both sides of its limits.
const LIMITS: RequestLimits = RequestLimits::for_queue(16);

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let n = usize::from(input.u8() % 33);
    let descs: Vec<Desc> = (0..n)
        .map(|_| Desc {
            addr: input.u64(),
            len: input.u32(),
            writable: input.u8() & 1 == 1,
        })
        .collect();
    let mem = guest_memory(input.rest());
    let writable_bytes: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    match parse(&mem, &descs, &LIMITS) {
        Err(rejection) => {
            if let Some(status) = rejection.status {
                assert!(mem.address_in_range(status), "status outside guest memory");
            }
        }
        Ok(req) => {
            assert!(mem.address_in_range(req.status));
            let dev = MemoryDevice::new(DISK).expect("memory disk");
            let serial = b"fuzz-serial-0123456789";
            let target = Target {
                dev: &dev,
                read_only: flags & 1 != 0,
                serial: &serial[..usize::from(flags >> 3) % (serial.len() + 1)],
                writeback: flags & 2 != 0,
                on_failure: None,
            };
            let used = complete(&mem, &req, &target);
            // The used length counts bytes written into the chain's writable buffers.
            assert!(
                u64::from(used) <= writable_bytes,
                "used length {used} exceeds the {writable_bytes} writable bytes"
            );
        }
    }
}
