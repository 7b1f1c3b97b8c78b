//! `diffshield device-check`: the checks of a device run (`diffshield::device_check`), one JSON
//! line each, then a summary; exit 1 when one fails. scripts/gpu_check.sh runs it with
//! `--backend cuda`; the tests run it on the CPU.

use super::DefenseArgs;
use clap::Args;
use diffshield::device_check;
use diffshield::manifest::Manifest;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

/// Options of `diffshield device-check`.
#[derive(Args)]
pub struct DeviceCheckArgs {
    /// The golden vectors folder (tests/vectors of the source tree).
    #[arg(long)]
    vectors: PathBuf,
    /// CIFAR-10 file for the defended accuracy (skipped without).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Images of the accuracy check.
    #[arg(long, default_value_t = 500)]
    images: usize,
    /// The CPU's defended accuracy on the same images and seed (a fraction): the check fails
    /// more than one point away from it.
    #[arg(long)]
    expect_acc: Option<f64>,
    /// Largest relative eps error of the golden vectors.
    #[arg(long, default_value_t = 1e-3)]
    max_eps_rel: f64,
    /// Batch sizes whose decisions must agree, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,256")]
    batches: Vec<usize>,
    /// Frames timed at batch 1 (0: no speed figures).
    #[arg(long, default_value_t = 50)]
    speed_frames: usize,
    /// Batch of the throughput figure.
    #[arg(long, default_value_t = 256)]
    speed_batch: usize,
    #[command(flatten)]
    defense: DefenseArgs,
}

fn line(out: &mut impl Write, v: serde_json::Value) -> anyhow::Result<()> {
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .map_err(|source| diffshield::Error::Io { path: "stdout".into(), source })?;
    Ok(())
}

/// One check's outcome: its JSON line and, where it failed, why.
type Outcome = anyhow::Result<(serde_json::Value, Option<String>)>;

/// Runs `diffshield device-check`. A check that errors (an op the device runtime cannot run,
/// say) is reported as failed with its error and the next one still runs: a GPU lease is short,
/// so one run must say everything it can.
pub fn device_check(args: &DeviceCheckArgs) -> anyhow::Result<()> {
    // The user's input is checked before the first check runs: a bad option or data file is
    // a usage error (exit 2), not a failed check after minutes of others.
    device_check::check_options(&args.batches, args.speed_frames, args.speed_batch)?;
    let bad = |what: String| diffshield::Error::InvalidConfig(what);
    if !(args.max_eps_rel.is_finite() && args.max_eps_rel >= 0.0) {
        return Err(bad(format!("--max-eps-rel must be >= 0, got {}", args.max_eps_rel)).into());
    }
    if let Some(want) = args.expect_acc.filter(|a| !(0.0..=1.0).contains(a)) {
        return Err(bad(format!("--expect-acc is a fraction in [0, 1], got {want}")).into());
    }
    if args.data.is_some() && args.images == 0 {
        return Err(bad("--images 0 checks no image".into()).into());
    }
    let set = match &args.data {
        Some(data) => Some(diffshield::data::cifar::read_cifar_bin(data, Some(args.images))?),
        None => None,
    };
    let mut config = args.defense.resolve()?;
    config.seed.get_or_insert(0);
    let mut out = std::io::stdout().lock();
    let mut failed = Vec::new();
    let engine = diffshield::backend::engine(&config)?;
    // The CPU and, on the CPU engine, the kernel level and thread count: what the speed
    // figures belong to.
    let kernels = match engine {
        diffshield::backend::tract::Engine::Cpu(_) => Some(
            diffshield::backend::KernelLevel::from_env()
                .map_err(diffshield::Error::InvalidConfig)?
                .name(),
        ),
        _ => None,
    };
    let cpu = diffshield::backend::cpu_name();
    line(
        &mut out,
        json!({"check": "engine", "engine": engine.name(), "cpu": cpu, "kernels": kernels,
               "threads": kernels.is_some().then_some(config.threads)}),
    )?;
    let manifest = Manifest::load(&config.models_dir()?)?;
    let mut report =
        |out: &mut std::io::StdoutLock, name: &str, r: Outcome| -> anyhow::Result<()> {
            match r {
                Ok((v, fail)) => {
                    failed.extend(fail);
                    line(out, v)
                }
                Err(e) => {
                    let error = super::output::error_text(&e);
                    failed.push(format!("{name}: {error}"));
                    line(out, json!({"check": name, "passed": false, "error": error}))
                }
            }
        };
    match device_check::placement(&manifest, &config, &engine, 1) {
        Ok(ps) => {
            for p in ps {
                line(&mut out, json!({"check": "placement", "placement": p}))?;
            }
        }
        Err(e) => report(&mut out, "placement", Err(e.into()))?,
    }
    let golden = || -> Outcome {
        let g = device_check::golden(&args.vectors, &manifest, &engine)?;
        let ok = g.max_eps_rel() <= args.max_eps_rel && g.labels_agree;
        let fail = (!ok).then(|| format!("golden vectors: eps error {:.2e}", g.max_eps_rel()));
        Ok((
            json!({"check": "golden", "passed": ok, "max_eps_rel": g.max_eps_rel(), "golden": g}),
            fail,
        ))
    };
    report(&mut out, "golden", golden())?;
    if let Some(set) = &set {
        let accuracy = || -> Outcome {
            let mut defense = diffshield::Defense::from_config(&diffshield::DefenseConfig {
                votes: 1,
                ..config.clone()
            })?;
            let acc = defense.accuracy(set.images.view(), &set.labels, true, &mut |_| {})?;
            let got = acc.purified_acc.unwrap_or(0.0);
            let ok = args.expect_acc.is_none_or(|want| (got - want).abs() <= 0.01);
            let fail =
                (!ok).then(|| format!("defended accuracy {got:.4} vs {:?}", args.expect_acc));
            Ok((
                json!({"check": "accuracy", "passed": ok, "images": acc.images, "defended": got,
                       "clean": acc.clean_acc, "expected": args.expect_acc, "ms": acc.purified_ms}),
                fail,
            ))
        };
        report(&mut out, "accuracy", accuracy())?;
    }
    let batches = || -> Outcome {
        let b = device_check::batches(&config, &args.batches)?;
        let ok = b.labels_agree && b.finite && b.max_prob_diff <= 1e-3;
        let fail = (!ok).then(|| {
            format!("batch sizes disagree (max probability difference {:.2e})", b.max_prob_diff)
        });
        Ok((json!({"check": "batches", "passed": ok, "batches": b}), fail))
    };
    report(&mut out, "batches", batches())?;
    if args.speed_frames > 0 {
        let speed = || -> Outcome {
            let s = device_check::speed(&config, args.speed_frames, args.speed_batch)?;
            Ok((
                json!({"check": "speed", "denoiser": config.denoiser, "t_star": config.t_star,
                       "timesteps": config.plan_spec().ok().map(|p| format!("{p:?}")), "speed": s}),
                None,
            ))
        };
        report(&mut out, "speed", speed())?;
    }
    line(&mut out, json!({"check": "summary", "passed": failed.is_empty(), "failed": failed}))?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(diffshield::Error::CheckFailed(format!("device check failed: {}", failed.join("; ")))
            .into())
    }
}
