//! The CIFAR-10 binary format: a file is a concatenation of records of
//! [`CIFAR_RECORD_BYTES`] (3073) bytes, each 1 label byte (0..=9) followed by the 32x32 image as
//! 1024 red, 1024 green, then 1024 blue bytes, each plane row-major (row 0 first, left to right).
//!
//! That byte order is exactly CHW, so a record's pixel bytes map one to one, in order, onto a
//! `[3, 32, 32]` array.

use crate::error::{Error, Result};
use ndarray::Array4;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Side of a CIFAR-10 image in pixels (images are square).
pub const CIFAR_SIDE: usize = 32;
/// Number of classes a CIFAR-10 label can name (labels are 0..=9).
pub const CIFAR_CLASSES: u8 = 10;
/// Pixel bytes of one record: 3 channels x 32 x 32.
pub const CIFAR_IMAGE_BYTES: usize = 3 * CIFAR_SIDE * CIFAR_SIDE;
/// Bytes of one record: 1 label byte + [`CIFAR_IMAGE_BYTES`] pixel bytes.
pub const CIFAR_RECORD_BYTES: usize = 1 + CIFAR_IMAGE_BYTES;

/// A CIFAR-10 file read into memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CifarSet {
    /// Images, NCHW `[N, 3, 32, 32]`, RGB, `f32` in \[0,1\] (byte / 255).
    pub images: Array4<f32>,
    /// Class labels, 0..=9, one per image, in file order.
    pub labels: Vec<u8>,
}

impl CifarSet {
    /// Number of images (records) in the set.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True where the set holds no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// True where `path` has the extension `.bin` (any case), the CIFAR-10 binary convention.
/// Looks at the name only; the content is checked by [`read_cifar_bin`].
pub fn is_cifar_bin(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("bin"))
}

fn cifar_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Cifar { path: path.to_path_buf(), reason: reason.into() }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Opens a CIFAR-10 file and checks its size: a regular file of a non-zero whole number of
/// [`CIFAR_RECORD_BYTES`] records. Returns the open file and its number of records. The
/// check happens on the opened file's metadata, so a special file (a FIFO) is refused without
/// blocking on a read.
pub(crate) fn open_records(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !meta.is_file() {
        return Err(cifar_err(path, "not a regular file"));
    }
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let size = file.metadata().map_err(|e| io_err(path, e))?.len();
    let record = CIFAR_RECORD_BYTES as u64;
    if size == 0 {
        return Err(cifar_err(
            path,
            format!("empty file (0 bytes), expected records of {record} bytes"),
        ));
    }
    if !size.is_multiple_of(record) {
        let (whole, left) = (size / record, size % record);
        let noun = |n: u64, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        return Err(cifar_err(
            path,
            format!(
                "size {size} bytes is not a multiple of the record size {record} bytes \
                 ({whole} whole {} and {left} {} left over)",
                noun(whole, "record", "records"),
                noun(left, "byte", "bytes")
            ),
        ));
    }
    Ok((file, size / record))
}

/// Reads a CIFAR-10 binary file.
///
/// `limit`: read only the first `limit` records (all of them where the file has fewer); the
/// file is then streamed and only those records are read. `Some(0)` gives an empty set.
/// Without a limit the whole file is read at once.
///
/// The size of the whole file is checked in both cases (it must be a non-zero multiple of
/// [`CIFAR_RECORD_BYTES`]); labels are checked only in the records read.
///
/// Errors: [`Error::Io`] where the file is missing or unreadable; [`Error::Cifar`] where it is
/// not a regular file, empty, not a whole number of records, or a record's label is above 9.
pub fn read_cifar_bin(path: &Path, limit: Option<usize>) -> Result<CifarSet> {
    let (file, records) = open_records(path)?;
    let total = usize::try_from(records)
        .map_err(|_| cifar_err(path, format!("{records} records are too many for this machine")))?;
    let n = limit.map_or(total, |l| l.min(total));

    let bytes: Vec<u8> = match limit {
        None => {
            let mut buf = Vec::with_capacity(n * CIFAR_RECORD_BYTES);
            let mut reader = file;
            reader.read_to_end(&mut buf).map_err(|e| io_err(path, e))?;
            buf
        }
        Some(_) => {
            let mut buf = vec![0u8; n * CIFAR_RECORD_BYTES];
            BufReader::new(file).read_exact(&mut buf).map_err(|e| io_err(path, e))?;
            buf
        }
    };
    // The file may have changed between the size check and the read.
    if bytes.len() < n * CIFAR_RECORD_BYTES || !bytes.len().is_multiple_of(CIFAR_RECORD_BYTES) {
        return Err(cifar_err(
            path,
            format!(
                "read {} bytes, expected {} (file changed while reading?)",
                bytes.len(),
                n * CIFAR_RECORD_BYTES
            ),
        ));
    }

    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * CIFAR_IMAGE_BYTES);
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD_BYTES).take(n).enumerate() {
        let label = rec[0];
        if label >= CIFAR_CLASSES {
            return Err(cifar_err(
                path,
                format!(
                    "record {i} (0-based, at byte offset {}) has label {label}, expected 0..=9",
                    i * CIFAR_RECORD_BYTES
                ),
            ));
        }
        labels.push(label);
        pixels.extend(rec[1..].iter().map(|&b| f32::from(b) / 255.0));
    }
    let images = Array4::from_shape_vec((n, 3, CIFAR_SIDE, CIFAR_SIDE), pixels)
        .map_err(|e| cifar_err(path, format!("internal shape error: {e}")))?;
    Ok(CifarSet { images, labels })
}
