//! The CLI's inputs as one batch: image files, folders of them and CIFAR-10 `.bin` files, all
//! decoded and checked before anything is classified, so that a bad file fails the whole
//! command before any output is written.

use super::cifar::{is_cifar_bin, read_cifar_bin};
use super::image::{collect_image_paths, load_image};
use crate::error::{Error, Result};
use ndarray::{Array4, Axis};
use std::path::PathBuf;

/// Decoded inputs, in order.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// NCHW `[N, 3, h, w]` f32 RGB in \[0,1\], fitted to the requested size.
    pub images: Array4<f32>,
    /// Where each image came from: a file path, or `PATH#k` for record k of a CIFAR file.
    pub sources: Vec<String>,
    /// The true class where the input knows it (CIFAR records).
    pub labels: Vec<Option<u8>>,
}

impl Inputs {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// True where there are none.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// Loads `inputs` in order: a `.bin` file as CIFAR-10 records (with labels), a folder as its
/// images in file-name order (not recursive), any other file as an image, each fitted to
/// `size = (h, w)` (see [`load_image`]); at most `limit` images in all.
///
/// Errors: the first input that cannot be read or decoded, named; [`Error::InvalidConfig`]
/// where nothing is left to classify.
pub fn load_inputs(
    inputs: &[PathBuf],
    limit: Option<usize>,
    size: (usize, usize),
) -> Result<Inputs> {
    let mut images = Vec::new();
    let mut sources = Vec::new();
    let mut labels = Vec::new();
    let remaining = |n: usize| limit.map(|l| l.saturating_sub(n));
    for input in inputs {
        if remaining(images.len()) == Some(0) {
            break;
        }
        if input.is_file() && is_cifar_bin(input) {
            let set = read_cifar_bin(input, remaining(images.len()))?;
            if (set.images.shape()[2], set.images.shape()[3]) != size {
                return Err(Error::Shape {
                    expected: format!("{}x{} images for these models", size.0, size.1),
                    got: format!("32x32 CIFAR-10 records in {}", input.display()),
                });
            }
            for (i, (img, l)) in set.images.outer_iter().zip(&set.labels).enumerate() {
                images.push(img.to_owned());
                sources.push(format!("{}#{i}", input.display()));
                labels.push(Some(*l));
            }
            continue;
        }
        for path in collect_image_paths(std::slice::from_ref(input))? {
            if remaining(images.len()) == Some(0) {
                break;
            }
            images.push(load_image(&path, size)?);
            sources.push(path.display().to_string());
            labels.push(None);
        }
    }
    if images.is_empty() {
        return Err(Error::InvalidConfig("no images to classify (--limit 0?)".into()));
    }
    let views: Vec<_> = images.iter().map(|a| a.view()).collect();
    let images = ndarray::stack(Axis(0), &views).map_err(|e| Error::Backend(e.to_string()))?;
    Ok(Inputs { images, sources, labels })
}
