//! Measuring one grid point: latency of single defended frames, clean accuracy, and robust
//! accuracy under the configured attack ([`robust_accuracy`], the one place an attack runs).

use super::{AttackKind, AttackSettings, LatencyStats, MeasureSettings, PointResult, RobustResult};
use crate::attack::square::{square_attack, SquareConfig};
use crate::attack::Norm;
use crate::data::cifar::CifarSet;
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use ndarray::{s, Array2, ArrayView4};
use std::time::Instant;

/// Frame indices (which key the noise streams) of each kind of decision. Clean frames use the
/// image index, as `diffshield eval` does, so a point's clean accuracy is exactly `eval`'s on
/// the same images and seed; the others lie far away so their noise never coincides.
const WARMUP_FRAME_BASE: u64 = 1 << 39;
const QUERY_FRAME_BASE: u64 = 1 << 40;
const EVAL_FRAME_BASE: u64 = 1 << 41;

/// Measures `point` (its configuration is `settings.base` with the point's knobs set) on the
/// images of `set`.
pub fn measure_point(
    point: &super::GridPoint,
    key: &str,
    settings: &MeasureSettings,
    set: &CifarSet,
) -> Result<PointResult> {
    let started = Instant::now();
    let config = point.config(&settings.base);
    let mut pipeline = Pipeline::from_config(&config)?;
    let n = settings.clean_images;
    if set.len() < n {
        return Err(Error::InvalidConfig(format!(
            "tune: --images {n} but {} has only {} images",
            settings.data.display(),
            set.len()
        )));
    }
    // Warm-up: tract builds its plan for a batch size on first use and faults in its buffers.
    let first = set.images.slice(s![0..1, .., .., ..]);
    for w in 0..settings.warmup as u64 {
        pipeline.decide(first, WARMUP_FRAME_BASE + w)?;
    }
    let mut seconds = Vec::with_capacity(n);
    let mut cpu_seconds = Vec::with_capacity(n);
    // With one thread tract computes on this thread, so its CPU time is the frame's compute
    // time; with more, the pool's threads would be missed, so none is reported.
    let cpu_clock = config.threads == 1 && thread_cpu_ns().is_some();
    let mut correct = Vec::with_capacity(n);
    for i in 0..n {
        let x = set.images.slice(s![i..i + 1, .., .., ..]);
        let c = if cpu_clock { thread_cpu_ns() } else { None };
        let t = Instant::now();
        let d = pipeline.decide(x, i as u64)?;
        seconds.push(t.elapsed().as_secs_f64());
        if let (Some(c0), Some(c1)) = (c, thread_cpu_ns().filter(|_| cpu_clock)) {
            cpu_seconds.push(c1.saturating_sub(c0) as f64 * 1e-9);
        }
        correct.push(d.first().map(|d| d.label) == Some(usize::from(set.labels[i])));
    }
    let robust = match settings.attack.kind {
        AttackKind::None => None,
        _ => {
            let m = settings.attack.images;
            if set.len() < m {
                return Err(Error::InvalidConfig(format!(
                    "tune: --attack-images {m} but {} has only {} images",
                    settings.data.display(),
                    set.len()
                )));
            }
            let labels: Vec<usize> = set.labels[..m].iter().map(|&l| usize::from(l)).collect();
            let images = set.images.slice(s![0..m, .., .., ..]);
            // Clean decisions on the attacked images: from the clean pass, plus (untimed) the
            // images beyond it, with the same frame indices.
            let mut clean_ok = correct[..n.min(m)].to_vec();
            if m > n {
                let d = pipeline.decide(set.images.slice(s![n..m, .., .., ..]), n as u64)?;
                clean_ok.extend(d.iter().zip(&labels[n..]).map(|(d, &l)| d.label == l));
            }
            let r = robust_accuracy(
                &mut pipeline,
                images,
                &labels,
                &settings.attack,
                config.seed,
                &config.models,
            )?;
            r.map(|mut r| {
                r.clean_acc = Some(clean_ok.iter().filter(|&&c| c).count() as f64 / m as f64);
                r
            })
        }
    };
    let finished_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(PointResult {
        key: key.to_string(),
        point: point.clone(),
        label: point.label(),
        timesteps: pipeline.plan().timesteps().to_vec(),
        latency: LatencyStats::from_seconds(&seconds, &cpu_seconds),
        clean_acc: correct.iter().filter(|&&c| c).count() as f64 / n as f64,
        clean_images: n,
        robust,
        seconds: started.elapsed().as_secs_f64(),
        finished_unix,
        cached: false,
    })
}

/// Nanoseconds the calling thread has run on a CPU (Linux `/proc/thread-self/schedstat`, first
/// field); `None` where that file does not exist.
pub fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Robust accuracy of the defended `pipeline` on `images` with true `labels` under `attack`:
/// the attack crafts adversarial images, then each is classified `attack.runs` times with fresh
/// noise; the result is the mean fraction correct (and the fraction correct in every run).
/// `None` for [`AttackKind::None`].
pub fn robust_accuracy(
    pipeline: &mut Pipeline,
    images: ArrayView4<f32>,
    labels: &[usize],
    attack: &AttackSettings,
    seed: u64,
    models: &std::path::Path,
) -> Result<Option<RobustResult>> {
    let n = labels.len();
    let adversarial = match attack.kind {
        AttackKind::None => return Ok(None),
        AttackKind::Square => {
            let cfg = SquareConfig {
                threat: attack.threat,
                queries: attack.queries,
                p_init: if attack.threat.norm == Norm::Linf { 0.05 } else { 0.1 },
                seed: seed ^ 0x0051_5541_5245,
                // The purifier is stochastic: one misclassified query is not a broken image, so
                // the attack spends its whole budget driving the margin down.
                early_stop: false,
            };
            let mut model = |x: ArrayView4<f32>, q: u64| -> Result<Array2<f32>> {
                let d = pipeline.decide(x, QUERY_FRAME_BASE + q * n as u64)?;
                let classes = d.first().map_or(0, |d| d.probs.len());
                let rows: Vec<f32> = d.iter().flat_map(|d| d.probs.iter().copied()).collect();
                Array2::from_shape_vec((d.len(), classes), rows)
                    .map_err(|e| Error::Backend(e.to_string()))
            };
            let outcome = square_attack(&mut model, images, labels, &cfg)?;
            (outcome.adversarial, outcome.fooled.iter().filter(|&&f| f).count())
        }
        AttackKind::Bpda => return bpda_accuracy(pipeline, images, labels, attack, seed, models),
    };
    let (adv, fooled) = adversarial;
    let mut correct = vec![0u32; n];
    for r in 0..u64::from(attack.runs) {
        let decisions = pipeline.decide(adv.view(), EVAL_FRAME_BASE + r * n as u64)?;
        for (i, d) in decisions.iter().enumerate() {
            correct[i] += u32::from(d.label == labels[i]);
        }
    }
    let runs = attack.runs.max(1);
    Ok(Some(RobustResult {
        attack: attack.describe(),
        images: n,
        runs: attack.runs,
        clean_acc: None,
        mean: correct.iter().map(|&c| f64::from(c) / f64::from(runs)).sum::<f64>() / n as f64,
        worst: correct.iter().filter(|&&c| c == runs).count() as f64 / n as f64,
        fooled_during_attack: fooled,
    }))
}

/// Robust accuracy under the harness's PGD with BPDA + EOT (Linf/L2 per `attack.threat`).
#[cfg(feature = "twin")]
fn bpda_accuracy(
    pipeline: &mut Pipeline,
    images: ArrayView4<f32>,
    labels: &[usize],
    attack: &AttackSettings,
    seed: u64,
    models: &std::path::Path,
) -> Result<Option<RobustResult>> {
    use crate::attack::gradients::AttackMode;
    use crate::attack::harness::{run_cell, AttackKind as Crafting, HarnessConfig, Twins};
    let manifest = crate::manifest::Manifest::load(models)?;
    let mut classifier = crate::grad::burn_twin::TwinClassifier::load(&manifest)?;
    let cfg = HarnessConfig {
        attack: Crafting::Pgd,
        steps: attack.pgd_steps,
        step_size: None,
        eot: attack.eot,
        queries: 0,
        runs: attack.runs,
        seed,
        loss: crate::grad::Loss::CrossEntropy,
        random_start: true,
    };
    cfg.validate()?;
    let mut twins = Twins { classifier: Some(&mut classifier), denoiser: None };
    let outcomes = run_cell(
        pipeline,
        &mut twins,
        &cfg,
        attack.threat,
        AttackMode::Bpda,
        images,
        labels,
        0,
        1,
    )?;
    let counts: Vec<u32> = outcomes.iter().map(|o| o.runs_correct).collect();
    let acc = crate::attack::eval::RunAccuracy::from_counts(&counts, attack.runs);
    Ok(Some(RobustResult {
        attack: attack.describe(),
        images: labels.len(),
        runs: attack.runs,
        clean_acc: None,
        mean: acc.mean,
        worst: acc.worst,
        fooled_during_attack: counts.iter().filter(|&&c| c == 0).count(),
    }))
}

#[cfg(not(feature = "twin"))]
fn bpda_accuracy(
    _: &mut Pipeline,
    _: ArrayView4<f32>,
    _: &[usize],
    attack: &AttackSettings,
    _: u64,
    _: &std::path::Path,
) -> Result<Option<RobustResult>> {
    attack.kind.check_available()?;
    Ok(None)
}
