//! FNV-1a, 64 bit: a small hash that is stable across platforms and Rust versions (unlike
//! `DefaultHasher`). It fingerprints model and data files (build.rs includes this file, so the
//! twin's recorded fingerprints and the runtime's check are the same function; attack reports
//! record them for `--resume`) and keys tune's cache.

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
