//! File output that never leaves a partial file: everything the library writes (reports, caches,
//! plots, PNGs) goes through [`write_atomically`] or [`write_atomically_with`].

use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of one process (several writers may target one folder).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically; see [`write_atomically_with`]. The folder must exist.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, |w| w.write_all(bytes).map_err(io_err(path)))
}

/// Lets `fill` write the content into a hidden temporary file
/// beside `path` (`.NAME.tmp-PID-K`), syncs it and renames it over `path`, so that a reader, a
/// killed run or a full disk never leaves a partial `path`. On any error the temporary file is
/// removed and `path` is untouched. The folder must exist (see [`create_dir`]).
pub fn write_atomically_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidConfig(format!("output path {} has no file name", path.display()))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written =
        write_and_sync(&tmp, fill).and_then(|()| fs::rename(&tmp, path).map_err(io_err(path)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Creates `dir` and its parents, as an error naming it.
#[cfg(feature = "tune")]
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

fn write_and_sync(tmp: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let file = File::create(tmp).map_err(io_err(tmp))?;
    let mut writer = BufWriter::new(file);
    fill(&mut writer)?;
    writer.flush().map_err(io_err(tmp))?;
    let file =
        writer.into_inner().map_err(|e| Error::Io { path: tmp.into(), source: e.into_error() })?;
    file.sync_all().map_err(io_err(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_on_error() {
        let dir = std::env::temp_dir().join(format!("diffshield-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub/out.txt");
        fs::create_dir_all(dir.join("sub")).unwrap();
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let failed = write_atomically_with(&path, |_| Err(Error::Backend("boom".into())));
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"two", "a failed write leaves the old file");
        let names: Vec<_> =
            fs::read_dir(dir.join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.txt")], "no temporary file left");
        let _ = fs::remove_dir_all(&dir);
    }
}
