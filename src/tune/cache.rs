//! One JSON file per measured grid point under the sweep's output folder, keyed by the point's
//! canonical configuration and the measurement settings. Files are written atomically (temporary
//! file, then rename) the moment a point finishes, so a killed sweep keeps what it finished and
//! a rerun measures only what is missing.

use super::PointResult;
use crate::error::{Error, Result};
use crate::files::write_atomically;
use std::path::{Path, PathBuf};

/// Bumped whenever what a cached number means changes; old files are then ignored.
pub const CACHE_VERSION: u32 = 1;

/// Subfolder of the output folder holding the per-point files.
pub const CACHE_DIR: &str = "points";

/// The cache file name's hash of a key (FNV-1a 64 of its UTF-8 bytes).
pub fn key_hash(key: &str) -> u64 {
    crate::fingerprint::fnv1a64(key.as_bytes())
}

/// The cache file of a key: `DIR/points/<16 hex digits of the key's hash>.json`.
pub fn path_for(out: &Path, key: &str) -> PathBuf {
    out.join(CACHE_DIR).join(format!("{:016x}.json", key_hash(key)))
}

/// The cached result for `key`, if a file exists and holds exactly that key (a file from
/// another key with the same hash, an older cache version or an unreadable file is ignored and
/// will be overwritten).
pub fn load(out: &Path, key: &str) -> Option<PointResult> {
    let path = path_for(out, key);
    let text = crate::files::read_input_to_string(&path).ok()?;
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
    crate::files::create_dir(&out.join(CACHE_DIR))?;
    let text = serde_json::to_string_pretty(result)
        .map_err(|e| Error::Backend(format!("serialising a tune result: {e}")))?;
    write_atomically(&path, text.as_bytes())?;
    Ok(path)
}
