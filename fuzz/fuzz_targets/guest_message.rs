#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmap_fuzz::core_checks::guest_message(data));
