//! `diffshield gradcheck`: the differentiable twins' gradients (classifier alone, one denoiser
//! call, the whole purifier with a fixed seed) against central finite differences.

use super::DefenseArgs;
use clap::Args;
use std::path::PathBuf;

/// Options of `diffshield gradcheck`.
#[derive(Args)]
pub struct GradcheckArgs {
    /// CIFAR-10 binary file the test images come from.
    #[arg(long)]
    data: PathBuf,
    /// Images checked together.
    #[arg(long, default_value_t = 2)]
    images: usize,
    /// Coordinates checked per gradient (half the largest, half random).
    #[arg(long, default_value_t = 16)]
    coords: usize,
    /// Finite-difference step in input units.
    #[arg(long, default_value_t = 1e-3)]
    h: f64,
    /// Fail (exit 1) when the denoiser's or the purifier's largest relative error exceeds this.
    #[arg(long, default_value_t = 5e-2)]
    max_rel_error: f64,
    /// The same for the classifier, whose ReLU/max-pool kinks make single difference quotients
    /// off by more (its median must still stay within --max-median-error).
    #[arg(long, default_value_t = 0.25)]
    max_rel_error_classifier: f64,
    /// Fail when any check's median relative error exceeds this.
    #[arg(long, default_value_t = 1e-2)]
    max_median_error: f64,
    /// Seed of the coordinates and of the purifier's noise.
    #[arg(long, default_value_t = 0)]
    check_seed: u64,
    /// Where the twins compute: cpu (burn flex) or wgpu (builds with --features wgpu).
    #[arg(long, default_value = "cpu")]
    grad_device: String,
    #[command(flatten)]
    defense: DefenseArgs,
}

/// Runs `diffshield gradcheck`.
pub fn gradcheck(args: &GradcheckArgs) -> anyhow::Result<()> {
    validate(args)?;
    check(args)
}

/// Refuses tolerances and counts that cannot mean anything, before any model is loaded.
fn validate(args: &GradcheckArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("--h", args.h),
        ("--max-rel-error", args.max_rel_error),
        ("--max-rel-error-classifier", args.max_rel_error_classifier),
        ("--max-median-error", args.max_median_error),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(diffshield::Error::InvalidConfig(format!(
                "{name} must be a positive number, got {v}"
            ))
            .into());
        }
    }
    if args.images == 0 || args.coords == 0 {
        return Err(diffshield::Error::InvalidConfig(
            "--images and --coords must be at least 1".into(),
        )
        .into());
    }
    // Each coordinate costs two purifications; more than the images' values (CIFAR-10 records)
    // cannot be picked, and would otherwise only be refused after the models load.
    let values = args.images.saturating_mul(diffshield::data::cifar::CIFAR_IMAGE_BYTES);
    if args.coords > values {
        return Err(diffshield::Error::InvalidConfig(format!(
            "--coords {} is more than the {values} values of {} image(s)",
            args.coords, args.images
        ))
        .into());
    }
    Ok(())
}

#[cfg(feature = "twin")]
fn check(args: &GradcheckArgs) -> anyhow::Result<()> {
    use diffshield::grad::burn_twin::{TwinClassifier, TwinDenoiser};
    use diffshield::grad::check::standard_checks;
    let mut config = args.defense.resolve()?;
    // A fixed seed: the check's noise must be reproducible.
    config.seed.get_or_insert(0);
    let manifest = diffshield::manifest::Manifest::load(&config.models_dir()?)?;
    let pipeline = diffshield::pipeline::Pipeline::from_config(&config)?;
    let set = diffshield::data::cifar::read_cifar_bin(&args.data, Some(args.images))?;
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let device: diffshield::grad::GradDevice = args.grad_device.parse()?;
    let mut denoiser = TwinDenoiser::load_on(&manifest, &config.denoiser, device)?;
    // The classifier every defended-mode attack differentiates.
    let role = diffshield::manifest::ClassifierRole::Defended;
    let mut classifier = TwinClassifier::load_role(&manifest, role, device)?;
    let started = std::time::Instant::now();
    let checks = standard_checks(
        pipeline.plan(),
        &mut denoiser,
        &mut classifier,
        set.images.view(),
        &labels,
        args.coords,
        args.h,
        args.check_seed,
    )?;
    let limit = |name: &str| {
        if name == "classifier" {
            args.max_rel_error_classifier
        } else {
            args.max_rel_error
        }
    };
    let ok = |c: &diffshield::grad::check::NamedCheck| {
        c.check.max_rel_error <= limit(&c.name) && c.check.median_rel_error <= args.max_median_error
    };
    let passed = checks.iter().all(ok);
    let summary: Vec<_> = checks
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "max_rel_error": c.check.max_rel_error,
                "median_rel_error": c.check.median_rel_error,
                "kinks_skipped": c.check.kinks,
                "coords": c.check.coords.len(),
                "h": c.check.h,
                "replay_error": c.replay_error,
                "max_rel_error_allowed": limit(&c.name),
                "passed": ok(c),
            })
        })
        .collect();
    let report = serde_json::json!({
        "images": labels.len(),
        "grad_device": device.to_string(),
        "denoiser": config.denoiser,
        "t_star": config.t_star,
        "timesteps": pipeline.plan().timesteps(),
        "eta": config.eta,
        "max_median_error_allowed": args.max_median_error,
        "passed": passed,
        "checks": summary,
        "details": checks,
        "seconds": started.elapsed().as_secs_f64(),
    });
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{report}")
            .and_then(|()| stdout.flush())
            .map_err(|source| diffshield::Error::Io { path: "stdout".into(), source })?;
    }
    if passed {
        Ok(())
    } else {
        Err(diffshield::Error::CheckFailed(
            "gradient check failed: a relative error exceeds its tolerance (see the JSON report)"
                .into(),
        )
        .into())
    }
}

/// Without the twin there is nothing to check.
#[cfg(not(feature = "twin"))]
fn check(_: &GradcheckArgs) -> anyhow::Result<()> {
    Err(diffshield::Error::AttackUnavailable(
        "gradcheck needs the differentiable twin (build with the default `twin` feature)".into(),
    )
    .into())
}
