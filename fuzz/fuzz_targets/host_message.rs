#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmap_fuzz::core_checks::host_message(data));
