//! One JSON file per measured grid point under the sweep's output folder, keyed by the point's
//! canonical configuration and the measurement settings. Files are written atomically (temporary
//! file, then rename) the moment a point finishes, so a killed sweep keeps what it finished and
//! a rerun measures only what is missing.

use super::PointResult;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Bumped whenever what a cached number means changes; old files are then ignored.
pub const CACHE_VERSION: u32 = 1;

/// Subfolder of the output folder holding the per-point files.
pub const CACHE_DIR: &str = "points";

/// 64-bit FNV-1a: small, stable across platforms and Rust versions (unlike `DefaultHasher`).
pub fn fnv1a64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache file of a key: `DIR/points/<16 hex digits of the key's hash>.json`.
pub fn path_for(out: &Path, key: &str) -> PathBuf {
    out.join(CACHE_DIR).join(format!("{:016x}.json", fnv1a64(key)))
}

/// The cached result for `key`, if a file exists and holds exactly that key (a file from
/// another key with the same hash, an older cache version or an unreadable file is ignored and
/// will be overwritten).
pub fn load(out: &Path, key: &str) -> Option<PointResult> {
    let path = path_for(out, key);
    let text = std::fs::read_to_string(&path).ok()?;
    let r: PointResult = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("ignoring unreadable cache file {}: {e}", path.display());
            return None;
        }
    };
    (r.key == key).then_some(r)
}

/// Writes `result` to its cache file atomically.
pub fn store(out: &Path, result: &PointResult) -> Result<PathBuf> {
    let path = path_for(out, &result.key);
    let text = serde_json::to_string_pretty(result)
        .map_err(|e| Error::Backend(format!("serialising a tune result: {e}")))?;
    write_atomically(&path, text.as_bytes())?;
    Ok(path)
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place, creating the
/// folder if needed, so no reader ever sees a partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}
