#![no_main]

// The target's input format and checks: src/xml_restore.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::xml_restore::run(data));
