//! A reader for the `.npy` files numpy writes (format 1.0/2.0, little-endian f4/f8/i8,
//! C order): the golden vectors' format. Values come back as f64 with their shape.

use crate::error::{Error, Result};
use std::path::Path;

/// An array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Npy {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// The values in C order, as f64.
    pub data: Vec<f64>,
}

/// Reads `path`. Errors name the file and what is wrong (not numpy, Fortran order, a dtype
/// other than `<f4`, `<f8`, `<i8`, a size that disagrees with the shape).
pub fn read_npy(path: &Path) -> Result<Npy> {
    let bad = |reason: String| Error::Pixels { what: path.display().to_string(), reason };
    let bytes = crate::files::read_input(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy file".into()));
    }
    let (hlen, start) = if bytes[6] == 1 {
        (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10)
    } else {
        let len = bytes.get(8..12).ok_or_else(|| bad("header cut short".into()))?;
        (u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize, 12)
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("header cut short or not text".into()))?;
    if !header.contains("'fortran_order': False") {
        return Err(bad("Fortran-order arrays are not read".into()));
    }
    let field = |key: &str, end: char| {
        header.split(key).nth(1).and_then(|s| s.split(end).next()).map(str::trim)
    };
    let descr = field("'descr': '", '\'').ok_or_else(|| bad("no dtype".into()))?;
    let shape: Vec<usize> = field("'shape': (", ')')
        .ok_or_else(|| bad("no shape".into()))?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| bad(format!("bad shape entry {s:?}"))))
        .collect::<Result<_>>()?;
    let body = &bytes[start + hlen..];
    let data: Vec<f64> = match descr {
        "<f4" => body
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        "<f8" => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        "<i8" => body
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        other => return Err(bad(format!("unsupported dtype {other}"))),
    };
    if data.len() != shape.iter().product::<usize>() {
        return Err(bad(format!("{} values for shape {shape:?}", data.len())));
    }
    Ok(Npy { shape, data })
}
