#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmap_fuzz::daemon_checks::api_attach(data));
