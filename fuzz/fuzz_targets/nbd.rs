#![no_main]

// The target's input format and checks: src/nbd.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::nbd::run(data));
