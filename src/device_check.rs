//! The checks a device run needs, behind `diffshield device-check` (scripts/gpu_check.sh runs
//! it on a GPU): where each model's nodes run, the golden vectors, batch-size consistency and
//! speed. They use only the engine-agnostic backend, so CI runs every line of them on the CPU
//! and a GPU run exercises nothing new but the device itself.

use crate::backend::tract::{Engine, TractClassifier, TractDenoiser};
use crate::config::{DefenseConfig, Precision};
use crate::data::npy::read_npy;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::noise::FixedNoise;
use crate::pipeline::Pipeline;
use crate::purify::Purification;
use crate::schedule::{DdimPlan, PlanSpec};
use crate::Classifier;
use ndarray::{Array4, ArrayView4};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Most frames the speed check times (over an hour and a half at 60 ms a frame).
pub const MAX_SPEED_FRAMES: usize = 100_000;

/// Refuses, before any check runs, option values no check can run with: batch sizes outside
/// 1..=[`crate::config::MAX_BATCH`], more than [`MAX_SPEED_FRAMES`] timed frames, a speed
/// batch outside that range when frames are timed. ([`batches`] and [`speed`] check their
/// own part again.)
pub fn check_options(sizes: &[usize], speed_frames: usize, speed_batch: usize) -> Result<()> {
    check_batches(sizes)?;
    check_speed(speed_frames, speed_batch)
}

/// Batch sizes must be listed and in 1..=[`crate::config::MAX_BATCH`].
fn check_batches(sizes: &[usize]) -> Result<()> {
    let max = crate::config::MAX_BATCH;
    if sizes.is_empty() || sizes.iter().any(|&n| n == 0 || n > max) {
        return Err(Error::InvalidConfig(format!(
            "--batches must list batch sizes in 1..={max}, got {sizes:?}"
        )));
    }
    Ok(())
}

/// At most [`MAX_SPEED_FRAMES`] timed frames, and a speed batch in 1..=
/// [`crate::config::MAX_BATCH`] when frames are timed.
fn check_speed(speed_frames: usize, speed_batch: usize) -> Result<()> {
    let max = crate::config::MAX_BATCH;
    if speed_frames > MAX_SPEED_FRAMES {
        return Err(Error::InvalidConfig(format!(
            "--speed-frames must be at most {MAX_SPEED_FRAMES}, got {speed_frames}"
        )));
    }
    if speed_frames > 0 && !(1..=max).contains(&speed_batch) {
        return Err(Error::InvalidConfig(format!(
            "--speed-batch must be in 1..={max}, got {speed_batch}"
        )));
    }
    Ok(())
}

/// Where one model's plan runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// `classifier` or `denoiser TIER`.
    pub model: String,
    /// Nodes in the plan.
    pub nodes: usize,
    /// Nodes the device runs (tract-cuda's `Cuda*`, `Gpu*` and cuDNN ops).
    pub on_device: usize,
    /// Host/device copies the runtime inserted.
    pub transfers: usize,
    /// The nodes left on the host (other than inputs and constants): (node, op). On a GPU a
    /// hot op here is a finding to fix.
    pub on_host: Vec<(String, String)>,
}

/// What a node of a plan is, by its op's name.
fn place(op: &str) -> &'static str {
    if op.starts_with("Cuda") || op.starts_with("Gpu") || op.contains("Cudnn") {
        "device"
    } else if op.starts_with("DeviceSync") {
        "transfer"
    } else if matches!(op, "Source" | "Const") {
        "input"
    } else {
        "host"
    }
}

/// The placement of the classifier's and the denoiser's nodes at batch `batch` on `engine`.
pub fn placement(
    manifest: &Manifest,
    config: &DefenseConfig,
    engine: &Engine,
    batch: usize,
) -> Result<Vec<Placement>> {
    let c = TractClassifier::load_on(manifest, config.precision, engine)?;
    let d = TractDenoiser::load_on(manifest, &config.denoiser, config.precision, engine)?;
    let models = [
        ("classifier".to_string(), c.plan_nodes(batch)?),
        (format!("denoiser {}", config.denoiser), d.plan_nodes(batch)?),
    ];
    Ok(models
        .into_iter()
        .map(|(model, nodes)| Placement {
            model,
            nodes: nodes.len(),
            on_device: nodes.iter().filter(|(_, op)| place(op) == "device").count(),
            transfers: nodes.iter().filter(|(_, op)| place(op) == "transfer").count(),
            on_host: nodes.into_iter().filter(|(_, op)| place(op) == "host").collect(),
        })
        .collect())
}

/// The golden vectors (tests/vectors) through the denoiser and classifier on an engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Golden {
    /// Per DDIM step: largest |eps - reference| relative to the reference's largest |eps|.
    pub eps_rel: Vec<f64>,
    /// Per DDIM step: largest |x_t - reference|.
    pub x_t_abs: Vec<f64>,
    /// Largest |purified - reference| (\[0,1\] pixels).
    pub purified_abs: f64,
    /// Largest |logit - reference|.
    pub logits_abs: f64,
    /// Whether the predicted labels are the reference's.
    pub labels_agree: bool,
}

impl Golden {
    /// The largest relative eps error of any step.
    pub fn max_eps_rel(&self) -> f64 {
        self.eps_rel.iter().copied().fold(0.0, f64::max)
    }
}

/// Runs the golden vectors of `dir` (README.json, input, noise, eps, x_t, purified, logits:
/// denoiser_s, T*=140, stride 10, eta 1, 4 images) on `engine`.
pub fn golden(dir: &Path, manifest: &Manifest, engine: &Engine) -> Result<Golden> {
    let read = |name: &str| read_npy(&dir.join(name));
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let input = read("input.npy")?;
    let n = *input.shape.first().unwrap_or(&0);
    let images = Array4::from_shape_vec((n, 3, 32, 32), f32s(input.data)).map_err(|e| {
        Error::Shape { expected: "input [N, 3, 32, 32]".into(), got: e.to_string() }
    })?;
    let per = 3 * 32 * 32;
    let noise = read("noise.npy")?;
    let draws = (0..noise.shape[0])
        .map(|d| {
            (0..n)
                .map(|i| f32s(noise.data[(d * n + i) * per..(d * n + i + 1) * per].to_vec()))
                .collect()
        })
        .collect();
    let mut noise = FixedNoise::new(draws);
    let (x_t, eps, purified, logits) =
        (read("x_t.npy")?, read("eps.npy")?, read("purified.npy")?, read("logits.npy")?);
    let entry = manifest.denoiser("s")?;
    let plan = DdimPlan::new(
        &manifest.schedule()?,
        entry.trained_range(),
        140,
        &PlanSpec::Stride(10),
        1.0,
    )?;
    let mut den = TractDenoiser::load_on(manifest, "s", Precision::F32, engine)?;
    let block = n * per;
    let max_abs = |a: ArrayView4<f32>, b: &[f64]| {
        a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max)
    };
    let mut run = Purification::start(&plan, images.view(), &mut noise)?;
    let (mut eps_rel, mut x_t_abs) = (Vec::new(), Vec::new());
    for k in 1..=plan.steps().len() {
        run.step(&mut den, &mut noise)?;
        let want = eps.data.get((k - 1) * block..k * block).ok_or_else(short)?;
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
        let got = run.last_eps().ok_or_else(short)?;
        eps_rel.push(max_abs(got, want) / scale);
        let want = x_t.data.get(k * block..(k + 1) * block).ok_or_else(short)?;
        x_t_abs.push(max_abs(run.state(), want));
    }
    let image = run.current_image().ok_or_else(short)?;
    let purified_abs = max_abs(image.view(), &purified.data);
    let mut clf = TractClassifier::load_on(manifest, Precision::F32, engine)?;
    let got = clf.logits(image.view())?;
    let logits_abs =
        got.iter().zip(&logits.data).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max);
    let classes = got.ncols().max(1);
    let argmax = |row: &[f64]| {
        row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
    };
    let labels_agree = got.outer_iter().zip(logits.data.chunks(classes)).all(|(g, w)| {
        let g: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
        argmax(&g) == argmax(w)
    });
    Ok(Golden { eps_rel, x_t_abs, purified_abs, logits_abs, labels_agree })
}

fn short() -> Error {
    Error::Shape { expected: "golden vectors for 14 steps".into(), got: "fewer".into() }
}

/// `n` frames of smooth colour ramps, a stand-in camera.
fn frames(n: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, 32, 32), |(i, c, y, x)| {
        ((i * 37 + c * 61 + y * 5 + x * 3) % 256) as f32 / 255.0
    })
}

/// Decisions of the same frames at several batch sizes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Batches {
    /// The batch sizes run.
    pub sizes: Vec<usize>,
    /// Whether the first frames got the same labels at every size.
    pub labels_agree: bool,
    /// Largest probability difference between any two sizes on those frames.
    pub max_prob_diff: f64,
    /// Whether every probability was finite.
    pub finite: bool,
}

/// Runs `sizes.max()` frames at every batch size of `sizes` (one pipeline call each) with a
/// fixed seed and compares the first `min(sizes)` frames.
pub fn batches(config: &DefenseConfig, sizes: &[usize]) -> Result<Batches> {
    check_batches(sizes)?;
    let mut config = config.clone();
    config.seed.get_or_insert(0);
    config.votes = 1;
    let mut pipeline = Pipeline::from_config(&config)?;
    let common = sizes.iter().copied().min().unwrap_or(0);
    let mut runs = Vec::new();
    for &n in sizes {
        let d = pipeline.decide(frames(n).view(), 0)?;
        runs.push(d);
    }
    let first = runs.first().cloned().unwrap_or_default();
    let (mut agree, mut diff, mut finite) = (true, 0.0f64, true);
    for r in &runs {
        finite &= r.iter().all(|d| d.probs.iter().all(|p| p.is_finite()));
        for (a, b) in first.iter().zip(r).take(common) {
            agree &= a.label == b.label;
            for (p, q) in a.probs.iter().zip(&b.probs) {
                diff = diff.max(f64::from((p - q).abs()));
            }
        }
    }
    Ok(Batches { sizes: sizes.to_vec(), labels_agree: agree, max_prob_diff: diff, finite })
}

/// Latency of single defended frames and throughput of a large batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Speed {
    /// Frames timed at batch 1 (after 5 untimed).
    pub frames: usize,
    /// Median wall time of one defended frame (batch 1, one vote), ms.
    pub frame_p50_ms: f64,
    /// The large batch.
    pub batch: usize,
    /// Defended images per second at that batch (the best of 3 calls).
    pub images_per_s: f64,
}

/// Times `frames` single frames and 3 calls of `batch` frames, one vote each.
pub fn speed(config: &DefenseConfig, frames_n: usize, batch: usize) -> Result<Speed> {
    check_speed(frames_n, batch)?;
    let mut config = config.clone();
    config.seed.get_or_insert(0);
    config.votes = 1;
    let mut pipeline = Pipeline::from_config(&config)?;
    let one = frames(1);
    for w in 0..5 {
        pipeline.decide(one.view(), w)?;
    }
    let mut ms = Vec::with_capacity(frames_n);
    for k in 0..frames_n {
        let t = Instant::now();
        pipeline.decide(one.view(), 5 + k as u64)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let big = frames(batch);
    pipeline.decide(big.view(), 0)?;
    let mut best = f64::INFINITY;
    for k in 0..3 {
        let t = Instant::now();
        pipeline.decide(big.view(), (k + 1) * batch as u64)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let sorted = crate::stats::sorted(ms);
    Ok(Speed {
        frames: frames_n,
        frame_p50_ms: crate::stats::percentile(&sorted, 50.0).unwrap_or(f64::NAN),
        batch,
        images_per_s: batch as f64 / best,
    })
}
