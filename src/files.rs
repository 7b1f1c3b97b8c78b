//! File output that never leaves a partial file: everything the library writes (reports, caches,
//! plots, PNGs) goes through [`write_atomically`] or [`write_atomically_with`]; inputs read
//! whole go through [`read_input`], which opens regular files only; and the digests that
//! outputs quote of their inputs ([`sha256_file`]).

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

/// Checks, before any work starts, that every output `(role, path)` can be written: a file
/// name (not a folder, no trailing slash), in an existing folder that takes a new file, not an
/// existing special file (a device or a FIFO, which the atomic rename would replace), and
/// neither one of the `inputs` nor another output. A bad `--out` is then found in a second,
/// not after an hour of attack.
pub fn check_outputs(outputs: &[(&str, &Path)], inputs: &[&Path]) -> Result<()> {
    let inputs: Vec<PathBuf> = inputs.iter().filter_map(|p| fs::canonicalize(p).ok()).collect();
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for &(role, path) in outputs {
        let bad =
            |reason: String| Error::InvalidConfig(format!("{role} {}: {reason}", path.display()));
        let existing = fs::metadata(path).ok();
        if existing.as_ref().is_some_and(fs::Metadata::is_dir)
            || path.as_os_str().to_string_lossy().ends_with('/')
        {
            return Err(bad("is a folder; give a file name".into()));
        }
        if let Some(meta) = existing.filter(|m| !m.is_file()) {
            let kind = file_kind(&meta.file_type());
            return Err(bad(format!("exists and is {kind}, which the output would replace")));
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
/// entries quote). A regular file only (see [`check_regular_file`]), streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    check_regular_file(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut file = File::open(path).map_err(io_err(path))?;
    std::io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    let digest = hasher.finalize();
    Ok(format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// Refuses anything but a regular file (links followed) as an input: a FIFO blocks its reader
/// until a writer comes, which may be never, and a device such as /dev/zero never ends. The
/// error names the path and what it is.
pub fn check_regular_file(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.is_file() {
        return Ok(());
    }
    let kind = file_kind(&meta.file_type());
    Err(Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({kind})"),
        ),
    })
}

/// What a file that is not a regular file is, in words.
fn file_kind(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "a special file"
    }
}

/// The whole of an input file, after [`check_regular_file`].
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    check_regular_file(path)?;
    fs::read(path).map_err(io_err(path))
}

/// What went wrong, without the path, for errors that name the path themselves.
pub(crate) fn reason(e: &Error) -> String {
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "file not found".into()
        }
        Error::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// A TOML parse error on one line: where it is and what, without the parser's multi-line
/// caret picture (errors are one line each, see docs/reliability.md).
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    }
}

/// The whole of an input text file (UTF-8), after [`check_regular_file`].
pub fn read_input_to_string(path: &Path) -> Result<String> {
    check_regular_file(path)?;
    fs::read_to_string(path).map_err(io_err(path))
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
        assert!(err(&[("--out", &dir.join("new/"))]).contains("folder"));
        #[cfg(unix)]
        assert!(err(&[("--out", Path::new("/dev/null"))]).contains("a character device"));
        let lock = OutputLock::acquire(&out).unwrap();
        assert!(OutputLock::acquire(&out).unwrap_err().to_string().contains("another run"));
        drop(lock);
        assert!(OutputLock::acquire(&out).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn inputs_are_read_from_regular_files_only() {
        let dir = std::env::temp_dir().join(format!("diffshield-inputs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("abc.txt");
        fs::write(&file, b"abc").unwrap();
        assert_eq!(read_input(&file).unwrap(), b"abc");
        assert_eq!(read_input_to_string(&file).unwrap(), "abc");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&file).unwrap(), format!("sha256:{abc}"));
        let mut special = vec![(dir.clone(), "a folder")];
        #[cfg(unix)]
        {
            // A FIFO with no writer would block a reader forever; /dev/zero never ends.
            let fifo = dir.join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
            special.push((fifo, "a FIFO"));
            special.push((PathBuf::from("/dev/zero"), "a character device"));
        }
        for (path, kind) in &special {
            let errors = [
                read_input(path).map(|_| ()),
                read_input_to_string(path).map(|_| ()),
                sha256_file(path).map(|_| ()),
            ];
            for e in errors {
                let e = e.expect_err("refused").to_string();
                assert!(e.contains(&format!("not a regular file ({kind})")), "{e}");
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
