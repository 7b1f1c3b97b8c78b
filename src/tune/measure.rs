//! Measuring one grid point: latency of single defended frames, clean accuracy, and robust
//! accuracy under the configured attack ([`robust_accuracy`], the one place an attack runs).

use super::{AttackSettings, LatencyStats, MeasureSettings, PointResult, RobustResult};
use crate::attack::eval::RunAccuracy;
use crate::attack::harness::{run_cell, AttackSpec, HarnessConfig, Twins};
use crate::attack::AttackKind;
use crate::data::cifar::CifarSet;
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use ndarray::{s, ArrayView4};
use std::time::Instant;

// Warm-up decisions draw from their own noise domain. Clean frames use the image index in the
// deployed domain, as `diffshield eval` does, so a point's clean accuracy is exactly `eval`'s on
// the same images and seed; the attack's own streams are the harness's domains.

/// Measures `point` (its configuration is `settings.base` with the point's knobs set) on the
/// images of `set`.
pub fn measure_point(
    point: &super::GridPoint,
    key: &str,
    settings: &MeasureSettings,
    set: &CifarSet,
) -> Result<PointResult> {
    let started = Instant::now();
    let mut config = point.config(&settings.base);
    crate::backend::resolve_precision(&mut config);
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
        pipeline.decide_in(first, crate::noise::NoiseDomain::Warmup, w)?;
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
        correct.push(d.first().and_then(|d| d.label) == Some(usize::from(set.labels[i])));
    }
    let robust = match settings.attack.kind {
        None => None,
        Some(_) => {
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
                clean_ok.extend(d.iter().zip(&labels[n..]).map(|(d, &l)| d.label == Some(l)));
            }
            let r = robust_accuracy(
                &mut pipeline,
                images,
                &labels,
                &settings.attack,
                config.seed.unwrap_or(super::FIXED_SEED),
                &config.models_dir()?,
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

/// Nanoseconds the calling thread has run on a CPU (POSIX `CLOCK_THREAD_CPUTIME_ID`); `None`
/// where the platform has no per-thread CPU clock.
///
/// Not `/proc/thread-self/schedstat`: for the running thread its run time only advances at
/// scheduler ticks (4 ms on the VM this was measured on), too coarse for 10-50 ms frames.
pub fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

/// Robust accuracy of the defended `pipeline` on `images` with true `labels` under `attack`:
/// the attack crafts adversarial images, then each is classified `attack.runs` times with fresh
/// noise; the result is the mean fraction correct (and the fraction correct in every run).
/// `None` without an attack.
pub fn robust_accuracy(
    pipeline: &mut Pipeline,
    images: ArrayView4<f32>,
    labels: &[usize],
    attack: &AttackSettings,
    seed: u64,
    models: &std::path::Path,
) -> Result<Option<RobustResult>> {
    let Some(kind) = attack.kind else { return Ok(None) };
    super::check_available(attack.kind)?;
    let twin = match kind {
        AttackKind::Square => None,
        AttackKind::Pgd | AttackKind::Apgd | AttackKind::AaRand => {
            crate::grad::load_classifier_twin(
                &crate::manifest::Manifest::load(models)?,
                crate::manifest::ClassifierRole::Defended,
                crate::grad::GradDevice::Cpu,
            )?
        }
    };
    let mut classifier = twin;
    let mut twins = Twins {
        classifier: classifier.as_deref_mut().map(|c| c as _),
        bare_classifier: None,
        denoiser: None,
    };
    let cfg = HarnessConfig {
        attacks: vec![AttackSpec::of_kind(
            kind,
            attack.pgd_steps,
            None,
            crate::grad::Loss::CrossEntropy,
            attack.queries,
            true,
        )],
        eot: attack.eot,
        runs: attack.runs,
        seed,
    };
    cfg.validate()?;
    let mode = super::attack_mode(kind);
    let outcomes = run_cell(pipeline, &mut twins, &cfg, attack.threat, mode, images, labels, 0, 1)?;
    let counts: Vec<u32> = outcomes.images.iter().map(|o| o.runs_correct).collect();
    let acc = RunAccuracy::from_counts(&counts, attack.runs);
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

#[cfg(test)]
mod tests {
    use super::thread_cpu_ns;

    /// The frontier compares points a few ms apart, so the clock must tick much finer than a
    /// scheduler tick (the /proc schedstat clock this replaced moved in 4 ms steps).
    #[test]
    fn thread_cpu_clock_resolves_well_below_a_millisecond() {
        let Some(start) = thread_cpu_ns() else {
            crate::test_skip::note("the per-thread CPU clock: this platform has none");
            return;
        };
        let mut now = start;
        let mut spins = 0u64;
        while now == start {
            spins = std::hint::black_box(spins + 1);
            now = thread_cpu_ns().expect("the clock worked a moment ago");
        }
        assert!(now - start < 500_000, "the thread CPU clock stepped {} ns", now - start);
    }
}
