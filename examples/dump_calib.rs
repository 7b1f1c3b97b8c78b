//! Writes the int8 calibration tensors: the inputs the denoiser actually sees when the project's
//! own purifier (float32, tract) runs on the calibration images, and the images the classifier
//! sees. Read by `tools/quantize/quantize.py`; see docs/int8.md.
//!
//! Usage: dump_calib CALIB.bin OUT_DIR [denoiser tier, default s] [models dir, default models]
//!
//! Image i is purified with plan i % 5 of T* in {60, 100, 140, 200, 300}, stride 10, eta 1,
//! noise seed 0 and frame index i (the runtime's own noise streams), so every step of every
//! supported plan is covered. Files (raw little-endian f32, shapes in `meta.json`):
//! - `den_x.f32` [K, 3, 32, 32]: x_t before each denoiser call; `den_t.f32` [K]: its t;
//! - `clf_x.f32` [2N, 3, 32, 32]: the N purified images, then the N clean ones.

use diffshield::backend::tract::TractDenoiser;
use diffshield::data::cifar::read_cifar_bin;
use diffshield::manifest::Manifest;
use diffshield::noise::{SeededNoise, StreamId};
use diffshield::purify::Purification;
use diffshield::{DdimPlan, PlanSpec};
use ndarray::{concatenate, Array4, Axis};
use std::io::Write;
use std::path::PathBuf;

/// The plans the int8 denoiser is calibrated for.
const T_STARS: [u32; 5] = [60, 100, 140, 200, 300];
const STRIDE: u32 = 10;
const BATCH: usize = 8;

fn write_f32(path: &PathBuf, data: impl Iterator<Item = f32>) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for v in data {
        f.write_all(&v.to_le_bytes())?;
    }
    f.flush()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: dump_calib CALIB.bin OUT_DIR [tier] [models]");
    }
    let out = PathBuf::from(&args[2]);
    let tier = args.get(3).cloned().unwrap_or_else(|| "s".into());
    let models = PathBuf::from(args.get(4).cloned().unwrap_or_else(|| "models".into()));
    std::fs::create_dir_all(&out)?;
    let set = read_cifar_bin(&PathBuf::from(&args[1]), None)?;
    let manifest = Manifest::load(&models)?;
    let entry = manifest.denoiser(&tier)?.clone();
    let schedule = manifest.schedule()?;
    let mut den = TractDenoiser::load(&manifest, &tier)?;
    let n = set.len();
    let mut xs: Vec<Array4<f32>> = Vec::new();
    let mut ts: Vec<f32> = Vec::new();
    let mut purified = Array4::<f32>::zeros((n, 3, 32, 32));
    for (p, &t_star) in T_STARS.iter().enumerate() {
        let plan = DdimPlan::new(
            &schedule,
            entry.trained_range(),
            t_star,
            &PlanSpec::Stride(STRIDE),
            1.0,
        )?;
        let idx: Vec<usize> = (p..n).step_by(T_STARS.len()).collect();
        for chunk in idx.chunks(BATCH) {
            let images = set.images.select(Axis(0), chunk);
            let ids = chunk.iter().map(|&i| StreamId::of_frame(i as u64, 0)).collect();
            let mut noise = SeededNoise::new(0, ids);
            let mut run = Purification::start(&plan, images.view(), &mut noise)?;
            for c in plan.steps() {
                xs.push(run.state().to_owned());
                ts.extend(std::iter::repeat_n(c.t as f32, chunk.len()));
                run.step(&mut den, &mut noise)?;
            }
            let img = run.current_image().expect("plan has steps");
            for (k, &i) in chunk.iter().enumerate() {
                purified.index_axis_mut(Axis(0), i).assign(&img.index_axis(Axis(0), k));
            }
        }
        eprintln!("T*={t_star}: {} images, {} denoiser inputs so far", idx.len(), ts.len());
    }
    let views: Vec<_> = xs.iter().map(|a| a.view()).collect();
    let den_x = concatenate(Axis(0), &views)?;
    let clf_x = concatenate(Axis(0), &[purified.view(), set.images.view()])?;
    write_f32(&out.join("den_x.f32"), den_x.iter().copied())?;
    write_f32(&out.join("den_t.f32"), ts.iter().copied())?;
    write_f32(&out.join("clf_x.f32"), clf_x.iter().copied())?;
    let meta = serde_json::json!({
        "images": n, "denoiser": tier, "t_stars": T_STARS, "stride": STRIDE, "eta": 1.0,
        "seed": 0, "den_x": den_x.shape(), "den_t": [ts.len()], "clf_x": clf_x.shape(),
    });
    std::fs::write(out.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    eprintln!(
        "wrote {} ({} denoiser inputs, {} classifier inputs)",
        out.display(),
        ts.len(),
        clf_x.shape()[0]
    );
    Ok(())
}
