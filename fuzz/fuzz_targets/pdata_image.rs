#![no_main]

// The target's input format and checks: src/pdata_image.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::pdata_image::run(data));
