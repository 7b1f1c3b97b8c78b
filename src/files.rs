//! File output that never leaves a partial file: everything the library writes (reports, caches,
//! plots, PNGs) goes through [`write_atomically`] or [`write_atomically_with`]; and the digests
//! that outputs quote of their inputs ([`sha256_file`]).

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

/// Where an output would land: its folder, canonicalised, joined with its file name. The
/// folder must exist.
fn resolved_output(role: &str, path: &Path) -> Result<PathBuf> {
    let bad = |reason: String| Error::InvalidConfig(format!("{role} {}: {reason}", path.display()));
    let name = path.file_name().ok_or_else(|| bad("has no file name".into()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = fs::canonicalize(dir).map_err(|e| bad(format!("its folder cannot be used ({e})")))?;
    let full = dir.join(name);
    // An existing output (or a link) is compared by what it points at.
    Ok(fs::canonicalize(&full).unwrap_or(full))
}

/// Checks, before any work starts, that every output `(role, path)` can be written: not a
/// folder, in an existing folder that takes a new file, and neither one of the `inputs` nor
/// another output. A bad `--out` is then found in a second, not after an hour of attack.
pub fn check_outputs(outputs: &[(&str, &Path)], inputs: &[&Path]) -> Result<()> {
    let inputs: Vec<PathBuf> = inputs.iter().filter_map(|p| fs::canonicalize(p).ok()).collect();
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for &(role, path) in outputs {
        let bad =
            |reason: String| Error::InvalidConfig(format!("{role} {}: {reason}", path.display()));
        if path.is_dir() {
            return Err(bad("is a folder; give a file name".into()));
        }
        let full = resolved_output(role, path)?;
        if inputs.contains(&full) {
            return Err(bad("is an input of this run; it would be overwritten".into()));
        }
        if let Some((other, _)) = seen.iter().find(|(_, p)| *p == full) {
            return Err(bad(format!("is also the {other} output")));
        }
        let probe = full.with_file_name(format!(
            ".{}.probe-{}",
            full.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        File::create(&probe).map_err(|e| bad(format!("cannot be written ({e})")))?;
        let _ = fs::remove_file(&probe);
        seen.push((role, full));
    }
    Ok(())
}

/// An exclusive lock on an output, held while a run writes it (`.NAME.lock` beside it, locked
/// with the OS's advisory file lock, so a killed run leaves no stale lock behind).
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Locks `output` for this process; refused while another run holds it.
    pub fn acquire(output: &Path) -> Result<Self> {
        let name = output.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let path = output.with_file_name(format!(".{name}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::InvalidConfig(format!(
                "{} is being written by another run (it holds {}); wait for it or use another \
                 output",
                output.display(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::Io { path, source: e }),
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
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

/// SHA-256 of a whole file, as `sha256:` and 64 hex digits (what model cards and RobustBench
/// entries quote).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = fs::read(path).map_err(io_err(path))?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
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

    #[test]
    fn outputs_are_checked_before_work_and_locked_while_written() {
        let dir = std::env::temp_dir().join(format!("diffshield-outputs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let input = dir.join("data.bin");
        fs::write(&input, b"x").unwrap();
        let out = dir.join("r.json");
        assert!(check_outputs(&[("--out", &out)], &[&input]).is_ok());
        let err = |o: &[(&str, &Path)]| check_outputs(o, &[&input]).unwrap_err().to_string();
        assert!(err(&[("--out", &input)]).contains("input"));
        assert!(err(&[("--out", &out), ("--markdown", &dir.join("./r.json"))]).contains("--out"));
        assert!(err(&[("--out", &dir)]).contains("folder"));
        assert!(err(&[("--out", &dir.join("no/such/r.json"))]).contains("folder"));
        let lock = OutputLock::acquire(&out).unwrap();
        assert!(OutputLock::acquire(&out).unwrap_err().to_string().contains("another run"));
        drop(lock);
        assert!(OutputLock::acquire(&out).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }
}
