//! Image files: PNG, JPEG and PPM/PGM in, PNG out.
//!
//! Loading decodes with the `image` crate (format guessed from the file's first bytes, the
//! extension only as a fallback), converts to 8-bit RGB (grey is replicated, alpha is dropped
//! without compositing, 16-bit samples are scaled to 8 bits) and returns CHW `f32` in \[0,1\]
//! (byte / 255).
//!
//! Resizing: an image that already has the target size is used pixel for pixel. Any other is
//! scaled, keeping its aspect ratio, by the smallest factor that makes it cover the target
//! (for a square target: its shorter side becomes the target side), then centre-cropped.
//! The filter is [`FilterType::Triangle`]: bilinear interpolation when upscaling; when
//! downscaling the `image` crate widens the triangle's support by the scale factor, so it
//! averages over the source pixels each output pixel covers (antialiased, no aliasing of fine
//! texture, unlike plain bilinear sampling).

use crate::error::{Error, Result};
use ::image::codecs::png::PngEncoder;
use ::image::imageops::{self, FilterType};
use ::image::{
    ExtendedColorType, ImageBuffer, ImageEncoder, ImageReader, Pixel, Rgb32FImage, RgbImage,
};
use ndarray::{Array3, ArrayView3};
use std::ffi::OsStr;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// File extensions (lower case, compared case-insensitively) that [`collect_image_paths`]
/// takes from a folder.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "ppm", "pnm", "pgm"];

fn image_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Image { path: path.to_path_buf(), reason: reason.into() }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Most pixels an input image (or a raw frame) may have: 64 Mpx (8192 x 8192, 192 MiB as RGB8).
/// Checked from the header before anything is decoded, so a small file claiming a huge image
/// (a decompression bomb) is refused instead of exhausting memory.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// Most bytes the decoder may allocate at once (the RGB8 image of [`MAX_IMAGE_PIXELS`] and some
/// room for a 16-bit or alpha intermediate).
const MAX_DECODE_BYTES: u64 = 8 * MAX_IMAGE_PIXELS;

fn check_pixels(path: &Path, what: &str, w: u64, h: u64) -> Result<()> {
    if w.saturating_mul(h) > MAX_IMAGE_PIXELS {
        return Err(image_err(
            path,
            format!(
                "{what} of {w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} pixels (64 Mpx) \
                 allowed"
            ),
        ));
    }
    Ok(())
}

/// A JPEG must end with its end-of-image marker (FF D9), after which only padding may follow;
/// the decoder itself fills a cut-off file with grey and reports nothing.
fn check_jpeg_complete(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 4096;
    let mut f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).map_err(|e| io_err(path, e))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| io_err(path, e))?;
    let end =
        tail.iter().rposition(|b| !matches!(b, 0x00 | b'\n' | b'\r' | b' ')).map_or(0, |i| i + 1);
    if tail[..end].ends_with(&[0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(image_err(path, "truncated JPEG: the file does not end with the end-of-image marker"))
    }
}

/// Decodes `path` to 8-bit RGB, refusing more than [`MAX_IMAGE_PIXELS`] (from the header, before
/// decoding) and truncated JPEGs. Decoder panics (there should be none) are turned into errors.
fn decode_rgb8(path: &Path) -> Result<RgbImage> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !meta.is_file() {
        return Err(image_err(path, "not a regular file"));
    }
    if meta.len() == 0 {
        return Err(image_err(path, "empty file (0 bytes)"));
    }
    let open = || -> Result<ImageReader<std::io::BufReader<fs::File>>> {
        let reader = ImageReader::open(path).map_err(|e| io_err(path, e))?;
        let reader = reader.with_guessed_format().map_err(|e| io_err(path, e))?;
        if reader.format().is_none() {
            return Err(image_err(
                path,
                "unrecognised image format (expected PNG, JPEG or PPM/PGM content)",
            ));
        }
        Ok(reader)
    };
    let probe = open()?;
    if probe.format() == Some(::image::ImageFormat::Jpeg) {
        check_jpeg_complete(path)?;
    }
    let (w, h) = catch_unwind(AssertUnwindSafe(|| probe.into_dimensions()))
        .map_err(|_| image_err(path, "the image decoder panicked on this file (corrupt data?)"))?
        .map_err(|e| decode_err(path, e))?;
    check_pixels(path, "an image", u64::from(w), u64::from(h))?;
    let mut reader = open()?;
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoded = catch_unwind(AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| image_err(path, "the image decoder panicked on this file (corrupt data?)"))?
        .map_err(|e| decode_err(path, e))?;
    let rgb = decoded.into_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(image_err(
            path,
            format!("zero-size image ({}x{} pixels)", rgb.width(), rgb.height()),
        ));
    }
    Ok(rgb)
}

fn decode_err(path: &Path, e: ::image::ImageError) -> Error {
    match e {
        ::image::ImageError::Limits(l) => {
            image_err(path, format!("too large to decode within this program's limits ({l})"))
        }
        // The file opened; running out of it while decoding is its content's fault.
        ::image::ImageError::IoError(source)
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            image_err(path, format!("truncated: {source}"))
        }
        ::image::ImageError::IoError(source) => io_err(path, source),
        other => image_err(path, format!("corrupt, truncated or unsupported data: {other}")),
    }
}

/// Size (width, height) in pixels that a `src_w` x `src_h` image is scaled to so that it covers
/// a `dst_w` x `dst_h` target with its aspect ratio kept; each side at least the target's.
fn cover_size(src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> (u32, u32) {
    let (sw, sh, dw, dh) = (src_w as f64, src_h as f64, dst_w as f64, dst_h as f64);
    // Compare dw/sw with dh/sh without dividing: the larger ratio decides.
    if dw * sh >= dh * sw {
        // Width is the binding side: it becomes exactly dst_w.
        let h = (sh * dw / sw).round().clamp(dh, u32::MAX as f64) as u32;
        (dst_w, h)
    } else {
        let w = (sw * dh / sh).round().clamp(dw, u32::MAX as f64) as u32;
        (w, dst_h)
    }
}

/// Checks an output size `(h, w)` in pixels and returns it as `(h, w)` in `u32`.
fn target_dims(size: (usize, usize)) -> Result<(u32, u32)> {
    let (h, w) = size;
    if h == 0 || w == 0 {
        return Err(Error::InvalidConfig(format!(
            "image target size {h}x{w} (h x w) must be non-zero"
        )));
    }
    match (u32::try_from(h), u32::try_from(w)) {
        (Ok(th), Ok(tw)) => Ok((th, tw)),
        _ => Err(Error::InvalidConfig(format!("image target size {h}x{w} is too large"))),
    }
}

/// Loads an image file as CHW `[3, h, w]` `f32` RGB in \[0,1\] (byte / 255), where
/// `size = (h, w)` is the output height and width in pixels.
///
/// PNG, JPEG and PPM/PGM are read, the format guessed from the content (see the module doc).
/// An image of exactly `h` x `w` pixels is used as is; any other is resized so that it covers
/// the target with its aspect ratio kept (shorter side = target side for a square target),
/// with the Triangle filter (bilinear, antialiased when downscaling), then centre-cropped
/// (where the excess is odd, the extra pixel is cut from the right/bottom). The decoded pixels
/// go through [`rgb8_to_chw`], so an in-memory image gives the same array as its file.
///
/// Errors: [`Error::Io`] where the file is missing or unreadable; [`Error::Image`] where it is
/// empty, not an image, corrupt, truncated, of an unsupported format or of zero size;
/// [`Error::InvalidConfig`] where `h` or `w` is 0. Never panics on any file content.
pub fn load_image(path: &Path, size: (usize, usize)) -> Result<Array3<f32>> {
    // Refuse a bad target size before touching the file.
    target_dims(size)?;
    let rgb = decode_rgb8(path)?;
    rgb8_to_chw(&rgb, size)
}

/// Turns an in-memory 8-bit RGB image into CHW `[3, h, w]` `f32` in \[0,1\] (byte / 255), where
/// `size = (h, w)` is the output height and width in pixels: exactly what [`load_image`] does
/// after decoding (same-size images used pixel for pixel, any other resized to cover the
/// target with its aspect ratio kept, Triangle filter, then centre-cropped).
///
/// Errors: [`Error::InvalidConfig`] where `h` or `w` is 0 or too large; [`Error::Shape`] where
/// the image has zero width or height.
pub fn rgb8_to_chw(rgb: &RgbImage, size: (usize, usize)) -> Result<Array3<f32>> {
    let (h, w) = size;
    let (th, tw) = target_dims(size)?;
    let (sw, sh) = rgb.dimensions();
    if sw == 0 || sh == 0 {
        return Err(Error::Shape {
            expected: "an RGB image of at least 1x1 pixels".into(),
            got: format!("{sw}x{sh} pixels (w x h)"),
        });
    }
    let fitted = fit(rgb, th, tw);
    let mut out = Array3::<f32>::zeros((3, h, w));
    for (x, y, px) in fitted.as_ref().unwrap_or(rgb).enumerate_pixels() {
        for c in 0..3 {
            out[[c, y as usize, x as usize]] = f32::from(px.0[c]) / 255.0;
        }
    }
    Ok(out)
}

/// The image scaled to cover `th` x `tw` (aspect ratio kept, Triangle filter) and centre-cropped
/// to it; `None` where it already has that size (used pixel for pixel).
fn fit<P>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    th: u32,
    tw: u32,
) -> Option<ImageBuffer<P, Vec<P::Subpixel>>>
where
    P: Pixel + 'static,
    P::Subpixel: 'static,
{
    let (sw, sh) = img.dimensions();
    if (sw, sh) == (tw, th) {
        return None;
    }
    let (nw, nh) = cover_size(sw, sh, tw, th);
    let scaled;
    // An extreme aspect ratio (1 x 10 000 000) would scale to billions of pixels before the
    // crop: crop the source to the target's aspect ratio first; its pixels are the same ones
    // the crop would keep, up to the filter's half-pixel border.
    if u64::from(nw) * u64::from(nh) > MAX_IMAGE_PIXELS {
        let (cw, ch) = if u64::from(sw) * u64::from(th) > u64::from(sh) * u64::from(tw) {
            (((u64::from(sh) * u64::from(tw)) / u64::from(th)).max(1) as u32, sh)
        } else {
            (sw, ((u64::from(sw) * u64::from(th)) / u64::from(tw)).max(1) as u32)
        };
        let inner = imageops::crop_imm(img, (sw - cw) / 2, (sh - ch) / 2, cw, ch).to_image();
        return Some(fit(&inner, th, tw).unwrap_or(inner));
    }
    let src = if (nw, nh) == (sw, sh) {
        img
    } else {
        scaled = imageops::resize(img, nw, nh, FilterType::Triangle);
        &scaled
    };
    let (x0, y0) = ((nw - tw) / 2, (nh - th) / 2);
    Some(imageops::crop_imm(src, x0, y0, tw, th).to_image())
}

/// (width, height) of a CHW `[3, h, w]` RGB array with h, w > 0 (an [`Error::Shape`] otherwise).
fn rgb_dims(chw: ArrayView3<f32>) -> Result<(u32, u32)> {
    let (c, h, w) = chw.dim();
    match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) if c == 3 && w > 0 && h > 0 => Ok((w, h)),
        _ => Err(Error::Shape {
            expected: "RGB pixels [3, h, w] with h, w > 0".into(),
            got: format!("{:?}", chw.shape()),
        }),
    }
}

/// Fits a CHW `[3, H, W]` f32 RGB image in \[0,1\] of any size to CHW `[3, h, w]`, where
/// `size = (h, w)`: the same scaling, filter and centre crop as [`rgb8_to_chw`], in f32 (no
/// rounding to bytes). An image of the target size is returned as is.
///
/// Errors: [`Error::Shape`] where `chw` is not `[3, H, W]` with H, W > 0; [`Error::Pixels`]
/// for a value that is NaN, infinite or outside \[0,1\]; [`Error::InvalidConfig`] for a bad size.
pub fn fit_chw_f32(chw: ArrayView3<f32>, size: (usize, usize)) -> Result<Array3<f32>> {
    let (th, tw) = target_dims(size)?;
    let (sw, sh) = rgb_dims(chw)?;
    if let Some(((ci, y, x), v)) = chw.indexed_iter().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
        return Err(Error::Pixels {
            what: "frame".into(),
            reason: format!("value {v} at (c,y,x)=({ci},{y},{x}) is not a [0,1] pixel"),
        });
    }
    if (sw, sh) == (tw, th) {
        return Ok(chw.to_owned());
    }
    let mut buf = Rgb32FImage::new(sw, sh);
    for (x, y, px) in buf.enumerate_pixels_mut() {
        for ci in 0..3 {
            px.0[ci] = chw[[ci, y as usize, x as usize]];
        }
    }
    let fitted = fit(&buf, th, tw).unwrap_or(buf);
    let mut out = Array3::<f32>::zeros((3, size.0, size.1));
    for (x, y, px) in fitted.enumerate_pixels() {
        for ci in 0..3 {
            // The filter's weights are non-negative and sum to one, so only rounding can step
            // outside [0,1].
            out[[ci, y as usize, x as usize]] = px.0[ci].clamp(0.0, 1.0);
        }
    }
    Ok(out)
}

/// Turns raw interleaved 8-bit RGB pixels (HWC: row 0 first, left to right, `R G B` per pixel,
/// `width * height * 3` bytes) of a `width` x `height` image into CHW `[3, h, w]` `f32` in
/// \[0,1\], like [`rgb8_to_chw`] (and so like [`load_image`] on a file of that image), where
/// `size = (h, w)` is the output height and width in pixels.
///
/// Errors: [`Error::Shape`] where `bytes` is not exactly `width * height * 3` long or a side is
/// 0; [`Error::InvalidConfig`] for a bad target size.
pub fn raw_rgb8_to_chw(
    bytes: &[u8],
    width: u32,
    height: u32,
    size: (usize, usize),
) -> Result<Array3<f32>> {
    let expected = u64::from(width) * u64::from(height) * 3;
    if width == 0 || height == 0 || bytes.len() as u64 != expected {
        return Err(Error::Shape {
            expected: format!("{width}*{height}*3 = {expected} bytes of raw RGB8 (w*h*3)"),
            got: format!("{} bytes", bytes.len()),
        });
    }
    let rgb = RgbImage::from_raw(width, height, bytes.to_vec()).ok_or_else(|| Error::Shape {
        expected: format!("{width}*{height}*3 = {expected} bytes of raw RGB8 (w*h*3)"),
        got: format!("{} bytes", bytes.len()),
    })?;
    rgb8_to_chw(&rgb, size)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(OsStr::to_str)
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Lists the images of one folder: its regular files (symbolic links followed) whose
/// extension is one of [`IMAGE_EXTENSIONS`] (any case), not recursing into sub-folders and
/// skipping hidden names (starting with `.`), sorted by file name. The list may be empty.
///
/// Errors: [`Error::Io`] (kind `NotFound` for a missing path) where the folder cannot be read.
pub fn list_folder_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && has_image_extension(&path) && path.is_file() {
            found.push(path);
        }
    }
    found.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(found)
}

/// Expands command-line inputs into image files, in order.
///
/// A file is taken as is (whatever its extension). A folder contributes its images as listed
/// by [`list_folder_images`]: regular files (symbolic links followed) whose extension is one
/// of [`IMAGE_EXTENSIONS`] (any case), not recursing into sub-folders and skipping hidden
/// names (starting with `.`), sorted by file name.
///
/// Errors: [`Error::Io`] naming the path: kind `NotFound` for a missing path, `InvalidInput`
/// for a folder that holds no such image (nothing in it to decode, so not [`Error::Image`]).
pub fn collect_image_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| io_err(input, e))?;
        if !meta.is_dir() {
            out.push(input.clone());
            continue;
        }
        let found = list_folder_images(input)?;
        if found.is_empty() {
            let reason = format!(
                "no PNG/JPEG/PPM images in this folder (files ending in .{}, any case; \
                 sub-folders are not searched)",
                IMAGE_EXTENSIONS.join(", .")
            );
            return Err(io_err(
                input,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
            ));
        }
        out.extend(found);
    }
    Ok(out)
}

/// Writes CHW `[3, h, w]` RGB pixels in \[0,1\] as an 8-bit PNG at `path`; each byte is
/// `round(v * 255)`, values outside \[0,1\] clamped first.
///
/// Atomic: the PNG is written to a hidden temporary file in the same folder and renamed over
/// `path` only once complete, so `path` never holds a partial image.
///
/// Errors: [`Error::Shape`] where the array is not `[3, h, w]` with `h, w > 0`;
/// [`Error::Pixels`] for a NaN or infinite value; [`Error::Io`] where the file cannot be
/// written (the temporary file is removed); [`Error::Image`] where encoding fails.
pub fn save_png(path: &Path, chw: ArrayView3<f32>) -> Result<()> {
    let (pw, ph) = rgb_dims(chw)?;
    let (h, w) = (ph as usize, pw as usize);
    if let Some(((ci, y, x), v)) = chw.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::Pixels {
            what: format!("PNG output {}", path.display()),
            reason: format!("non-finite value {v} at (c,y,x)=({ci},{y},{x})"),
        });
    }
    let mut bytes = Vec::with_capacity(3 * h * w);
    for y in 0..h {
        for x in 0..w {
            for ci in 0..3 {
                bytes.push((chw[[ci, y, x]].clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }

    crate::files::write_atomically_with(path, |writer| {
        PngEncoder::new(writer).write_image(&bytes, pw, ph, ExtendedColorType::Rgb8).map_err(|e| {
            match e {
                ::image::ImageError::IoError(source) => io_err(path, source),
                other => image_err(path, format!("PNG encoding failed: {other}")),
            }
        })
    })
}
