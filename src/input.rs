//! The frames a caller hands to [`crate::Defense`]: 8-bit RGB as a camera delivers it, or f32
//! pixels already in \[0,1\], of any size. Both are fitted to the models' input size the way the
//! CLI fits image files (shorter side scaled to the input side, Triangle filter, centre crop).

use crate::data::image::{fit_chw_f32, raw_rgb8_to_chw};
use crate::error::Result;
use ndarray::{Array3, ArrayView3};

/// One frame of any size.
#[derive(Debug, Clone, Copy)]
pub enum Image<'a> {
    /// Interleaved 8-bit RGB, row-major: `width * height * 3` bytes, `R G B` per pixel, row 0
    /// first (what most camera APIs and `image::RgbImage` hold). Pixel value = byte / 255.
    Rgb8 {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The `width * height * 3` bytes.
        pixels: &'a [u8],
    },
    /// CHW `[3, H, W]` f32 RGB, every value in \[0,1\].
    Chw(ArrayView3<'a, f32>),
}

impl<'a> Image<'a> {
    /// An interleaved RGB8 frame (see [`Image::Rgb8`]).
    pub fn rgb8(width: u32, height: u32, pixels: &'a [u8]) -> Self {
        Image::Rgb8 { width, height, pixels }
    }

    /// A CHW `[3, H, W]` f32 frame in \[0,1\].
    pub fn chw(pixels: ArrayView3<'a, f32>) -> Self {
        Image::Chw(pixels)
    }

    /// The frame fitted to `size = (height, width)` pixels as CHW `[3, h, w]` f32 in \[0,1\].
    ///
    /// Errors: [`crate::Error::Shape`] where the byte count does not match `width * height * 3`
    /// or the array is not `[3, H, W]`; [`crate::Error::Pixels`] for f32 values outside \[0,1\]
    /// or not finite.
    pub fn fit(&self, size: (usize, usize)) -> Result<Array3<f32>> {
        match *self {
            Image::Rgb8 { width, height, pixels } => raw_rgb8_to_chw(pixels, width, height, size),
            Image::Chw(view) => fit_chw_f32(view, size),
        }
    }
}

impl<'a> From<ArrayView3<'a, f32>> for Image<'a> {
    fn from(view: ArrayView3<'a, f32>) -> Self {
        Image::Chw(view)
    }
}

impl<'a> From<&'a Array3<f32>> for Image<'a> {
    fn from(a: &'a Array3<f32>) -> Self {
        Image::Chw(a.view())
    }
}
