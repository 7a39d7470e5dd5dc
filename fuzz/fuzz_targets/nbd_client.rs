#![no_main]

// The target's input format and checks: src/nbd_client.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::nbd_client::run(data));
