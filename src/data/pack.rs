//! The JPEG pack the CIFAR-10 training set ships as (`../shared/data/cifar10_train_jpeg.pack`):
//! records of `[u8 split][u8 label][u16 little-endian length][length bytes of JPEG]`,
//! concatenated. Decoded here with the `image` crate's JPEG decoder; the recipe's Python reader
//! (training/data.py) uses Pillow's libjpeg, which may round a pixel differently by one level.

use super::cifar::CifarSet;
use crate::error::{Error, Result};
use ndarray::Array4;
use std::path::Path;

/// Classes of CIFAR-10; a label at or above it is refused.
const CLASSES: u8 = 10;

fn pack_err(path: &Path, reason: String) -> Error {
    Error::Cifar { path: path.into(), reason }
}

/// True where `path` ends in `.pack` (any case). Looks at the name only.
pub fn is_jpeg_pack(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("pack"))
}

/// Reads the first `limit` (all by default) records of a JPEG pack whose split byte is `split`
/// into \[0,1\] f32 NCHW images, which must be 32x32 RGB.
///
/// Errors: [`Error::Io`] where the file cannot be read (a special file is refused before it is
/// read); [`Error::Cifar`] naming the record and its byte offset where the framing is cut
/// short, a label is above 9, a JPEG does not decode or is not 32x32.
pub fn read_jpeg_pack(path: &Path, split: u8, limit: Option<usize>) -> Result<CifarSet> {
    let bytes = crate::files::read_input(path)?;
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    let mut pos = 0usize;
    let mut record = 0usize;
    while pos < bytes.len() && limit.is_none_or(|l| labels.len() < l) {
        let at = |what: &str| format!("record {record} (at byte offset {pos}): {what}");
        let head = bytes.get(pos..pos + 4).ok_or_else(|| pack_err(path, at("cut short")))?;
        let (s, label, len) =
            (head[0], head[1], usize::from(u16::from_le_bytes([head[2], head[3]])));
        let jpeg = bytes
            .get(pos + 4..pos + 4 + len)
            .ok_or_else(|| pack_err(path, at(&format!("{len} JPEG bytes cut short"))))?;
        if label >= CLASSES {
            return Err(pack_err(path, at(&format!("label {label}, expected 0..=9"))));
        }
        if s == split {
            let img = image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
                .map_err(|e| pack_err(path, at(&format!("JPEG does not decode: {e}"))))?
                .into_rgb8();
            if img.dimensions() != (32, 32) {
                let (w, h) = img.dimensions();
                return Err(pack_err(path, at(&format!("{w}x{h} pixels, expected 32x32"))));
            }
            labels.push(label);
            for c in 0..3 {
                pixels.extend(img.pixels().map(|p| f32::from(p.0[c]) / 255.0));
            }
        }
        pos += 4 + len;
        record += 1;
    }
    if labels.is_empty() {
        return Err(pack_err(path, format!("no records of split {split}")));
    }
    let n = labels.len();
    let images = Array4::from_shape_vec((n, 3, 32, 32), pixels)
        .map_err(|e| Error::Backend(format!("pack images: {e}")))?;
    Ok(CifarSet { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_of(r: u8, g: u8, b: u8, size: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(size, size, image::Rgb([r, g, b]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
        out.into_inner()
    }

    fn record(split: u8, label: u8, jpeg: &[u8]) -> Vec<u8> {
        let mut r = vec![split, label];
        r.extend((jpeg.len() as u16).to_le_bytes());
        r.extend_from_slice(jpeg);
        r
    }

    fn write(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("diffshield_pack_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn records_of_the_split_decode_in_order_with_their_labels() {
        let mut bytes = record(0, 3, &jpeg_of(250, 10, 10, 32));
        bytes.extend(record(1, 5, &jpeg_of(10, 250, 10, 32)));
        bytes.extend(record(0, 7, &jpeg_of(10, 10, 250, 32)));
        let path = write("ok.pack", &bytes);
        let set = read_jpeg_pack(&path, 0, None).expect("reads");
        assert_eq!(set.labels, [3, 7]);
        assert!(set.images[[0, 0, 5, 5]] > 0.9 && set.images[[0, 2, 5, 5]] < 0.1);
        assert!(set.images[[1, 2, 5, 5]] > 0.9 && set.images[[1, 0, 5, 5]] < 0.1);
        assert_eq!(read_jpeg_pack(&path, 0, Some(1)).expect("reads").labels, [3]);
        assert_eq!(read_jpeg_pack(&path, 1, None).expect("reads").labels, [5]);
    }

    #[test]
    fn broken_packs_are_errors_naming_the_record() {
        let good = record(0, 1, &jpeg_of(100, 100, 100, 32));
        let mut cut = good.clone();
        cut.extend(&good[..good.len() - 3]);
        let e = read_jpeg_pack(&write("cut.pack", &cut), 0, None).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("cut short"), "{e}");
        let mut label = good.clone();
        label.extend(record(0, 12, &jpeg_of(1, 2, 3, 32)));
        let e = read_jpeg_pack(&write("label.pack", &label), 0, None).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("label 12"), "{e}");
        let big = record(0, 1, &jpeg_of(1, 2, 3, 40));
        let e = read_jpeg_pack(&write("big.pack", &big), 0, None).unwrap_err().to_string();
        assert!(e.contains("40x40"), "{e}");
        let junk = record(0, 1, b"not a jpeg at all");
        let e = read_jpeg_pack(&write("junk.pack", &junk), 0, None).unwrap_err().to_string();
        assert!(e.contains("does not decode"), "{e}");
        let dir = std::env::temp_dir();
        let e = read_jpeg_pack(&dir, 0, None).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
