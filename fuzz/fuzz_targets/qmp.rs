#![no_main]

// The target's input format and checks: src/qmp.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::qmp::run(data));
