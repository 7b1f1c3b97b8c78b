//! Image data in and out of the pipeline.
//!
//! Everything here produces or consumes pixels as `f32` in \[0,1\] (byte / 255), channels first:
//! one image is CHW `[3, H, W]`, a batch is NCHW `[N, 3, H, W]`, channels in RGB order.
//!
//! - [`cifar`]: the CIFAR-10 binary format (records of 1 label byte + 3x1024 pixel bytes).
//! - [`image`]: PNG / JPEG / PPM/PGM files: loading (with shorter-side resize and centre crop),
//!   folder listing and atomic PNG export.
//! - [`pack`]: the JPEG pack the training set ships as.

pub mod cifar;
pub mod image;
pub mod inputs;
pub mod npy;
pub mod pack;

pub use cifar::{is_cifar_bin, read_cifar_bin, CifarSet, CIFAR_IMAGE_BYTES, CIFAR_RECORD_BYTES};
pub use image::{collect_image_paths, load_image, save_png, IMAGE_EXTENSIONS};
