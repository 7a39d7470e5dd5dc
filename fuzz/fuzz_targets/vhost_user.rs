#![no_main]

// The target's input format and checks: src/vhost_user.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinblk_fuzz::vhost_user::run(data));
