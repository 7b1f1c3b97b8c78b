//! What a camera app does with diffshield: build a `Defense` once, hand it RGB8 frames.
//!
//! `cargo run --release --example embed -- [PHOTO] [--votes N] [--budget-ms MS]` classifies
//! PHOTO (default: the shipped samples/02_cat.png) from any working directory: the models are
//! found through `DIFFSHIELD_MODELS` or the models folder this build came from.

use diffshield::{Defense, Image};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut photo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("samples/02_cat.png");
    let mut builder = Defense::builder().votes(3);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--votes" => builder = builder.votes(value()?.parse()?),
            "--budget-ms" => builder = builder.budget_ms(value()?.parse()?),
            _ => photo = PathBuf::from(arg),
        }
    }
    // Any decoder will do; the defence takes interleaved RGB8 of any size.
    let rgb = image::open(&photo).map_err(|e| format!("{}: {e}", photo.display()))?.to_rgb8();
    // The app owns the process: let glibc keep freed model outputs for the next frame
    // (fewer page faults per call; a no-op with other C libraries).
    diffshield::memory::keep_freed_memory();
    let mut defense = builder.build()?;
    let decision = defense.classify(Image::rgb8(rgb.width(), rgb.height(), rgb.as_raw()))?;
    let top: Vec<String> =
        decision.top_k.iter().map(|c| format!("{} {:.2}", c.class, c.prob)).collect();
    println!(
        "{}: {} (votes {}/{}, mean probability {:.2}; top {}) in {:.1} ms, seed {}",
        photo.display(),
        decision.class,
        (decision.confidence.vote_share * decision.vote_labels.len() as f32).round(),
        decision.vote_labels.len(),
        decision.confidence.mean_prob,
        top.join(", "),
        decision.purify_ms + decision.classify_ms,
        decision.seed,
    );
    Ok(())
}
