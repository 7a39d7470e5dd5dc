#![no_main]

// The target's input format and checks: src/virtio_queue.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::virtio_queue::run(data));
