#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffshield_fuzz::cifar(data));
