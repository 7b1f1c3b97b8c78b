//! Regenerates `samples/`: the first 20 images of the shared CIFAR-10 test set as
//! `NN_<class>.png` (32x32), and `samples/other/cat_upscaled.jpg`, the first cat among them
//! upscaled to 96x72 (non-square, to exercise resize + centre crop).
//!
//! Run once from the crate root: `cargo run --release --example export_samples [CIFAR_BIN]`
//! (default `../shared/data/cifar10_test_2000.bin`).

use anyhow::{bail, Context, Result};
use diffshield::data::{read_cifar_bin, save_png};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::{self, FilterType};
use image::RgbImage;
use std::path::PathBuf;

/// Class names in label order (models/MODEL_CARD.md).
const CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data/cifar10_test_2000.bin"));
    let set = read_cifar_bin(&bin, Some(20))?;
    if set.len() < 20 {
        bail!("{} has only {} images, need 20", bin.display(), set.len());
    }
    let out = root.join("samples");
    std::fs::create_dir_all(out.join("other"))?;
    let mut cat_done = false;
    for (i, (img, &label)) in set.images.outer_iter().zip(&set.labels).enumerate() {
        let class = CLASSES[usize::from(label)];
        let path = out.join(format!("{i:02}_{class}.png"));
        save_png(&path, img)?;
        println!("wrote {}", path.display());
        if class == "cat" && !cat_done {
            let mut rgb = RgbImage::new(32, 32);
            for (x, y, px) in rgb.enumerate_pixels_mut() {
                for c in 0..3 {
                    px.0[c] = (img[[c, y as usize, x as usize]] * 255.0).round() as u8;
                }
            }
            let big = imageops::resize(&rgb, 96, 72, FilterType::CatmullRom);
            let jpg = out.join("other/cat_upscaled.jpg");
            let file = std::fs::File::create(&jpg).with_context(|| jpg.display().to_string())?;
            JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 85).encode_image(&big)?;
            println!("wrote {} (from {i:02}_{class}.png)", jpg.display());
            cat_done = true;
        }
    }
    if !cat_done {
        bail!("no cat among the first 20 images");
    }
    Ok(())
}
