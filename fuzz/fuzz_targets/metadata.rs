#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmap_fuzz::agent_checks::metadata(data));
