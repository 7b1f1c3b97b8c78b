//! `diffshield attack`: drives the harness over (threat model, mode, batch), saving the report
//! after every finished batch so that a killed run keeps what it measured and `--resume` picks
//! up where it stopped.

use super::{progress, write_atomically, DefenseArgs};
use anyhow::Context;
use clap::{Args, ValueEnum};
use diffshield::attack::eval::{correct_runs, Evaluated, RunAccuracy};
use diffshield::attack::gradients::AttackMode;
use diffshield::attack::harness::{run_cell, AttackKind, HarnessConfig, Twins};
use diffshield::attack::report::{AttackReport, COUNTING};
use diffshield::attack::ThreatModel;
use diffshield::data::cifar::read_cifar_bin;
use diffshield::grad::Loss;
use diffshield::pipeline::Pipeline;
use ndarray::s;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
enum AttackArg {
    /// Projected gradient descent along the mode's gradient.
    Pgd,
    /// Gradient-free Square Attack on the pipeline's outputs.
    Square,
}

#[derive(Clone, Copy, ValueEnum)]
enum LossArg {
    /// Cross-entropy of the true label.
    Ce,
    /// Best other logit minus the true logit.
    Margin,
}

/// Options of `diffshield attack`.
#[derive(Args)]
pub struct AttackArgs {
    /// CIFAR-10 binary file.
    #[arg(long)]
    data: PathBuf,
    /// Attack the first N images.
    #[arg(long, default_value_t = 16)]
    limit: usize,
    /// Threat models, e.g. linf:8/255,l2:1.0 [default: the paper's four].
    #[arg(long, value_delimiter = ',')]
    threat: Vec<String>,
    /// Modes: undefended, grey-box, bpda, white-box (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "white-box")]
    mode: Vec<String>,
    /// Crafting attack.
    #[arg(long, value_enum, default_value = "pgd")]
    attack: AttackArg,
    /// PGD steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// PGD step size in [0,1] pixel units, e.g. 2/255 [default: eps/4 for Linf, 2.5 eps/steps
    /// for L2].
    #[arg(long)]
    step_size: Option<String>,
    /// Purification samples averaged per gradient (BPDA and white-box).
    #[arg(long, default_value_t = 8)]
    eot: u32,
    /// Square's query budget per image.
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// Evaluation runs with fresh noise per adversarial image.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Loss PGD ascends.
    #[arg(long, value_enum, default_value = "ce")]
    loss: LossArg,
    /// Start PGD at the clean image instead of a random point of the ball.
    #[arg(long)]
    no_random_start: bool,
    /// Images attacked together (one saved batch).
    #[arg(long, default_value_t = 8)]
    attack_batch: usize,
    /// Seed of the attack's randomness (random start, EOT noise, Square).
    #[arg(long, default_value_t = 0)]
    attack_seed: u64,
    /// Write the JSON report here (atomically, after every finished batch).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in --out (same settings) instead of starting over.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Write the Markdown table (the paper's Table 2 layout) here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write JUnit XML here: one test case per (threat, mode), failing below --min-acc.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// JUnit thresholds: a fraction for every case (0.3) and/or MODE=FRACTION entries
    /// (white-box=0.25,bpda=0.3).
    #[arg(long, value_delimiter = ',')]
    min_acc: Vec<String>,
    /// Also print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    defense: DefenseArgs,
}

/// Parses `2/255` or `0.0078`.
fn fraction(s: &str) -> anyhow::Result<f64> {
    let bad = || diffshield::Error::InvalidConfig(format!("{s:?} is not a number or fraction"));
    let v = match s.split_once('/') {
        Some((a, b)) => {
            a.trim().parse::<f64>().map_err(|_| bad())?
                / b.trim().parse::<f64>().map_err(|_| bad())?
        }
        None => s.trim().parse::<f64>().map_err(|_| bad())?,
    };
    Ok(v)
}

/// `--min-acc` parsed: the bare value for every case, and MODE=X entries.
type Thresholds = (Option<f64>, Vec<(AttackMode, f64)>);

/// `--min-acc` as a lookup: the MODE=X entry of the mode, else the bare value, else none.
fn thresholds(entries: &[String]) -> anyhow::Result<Thresholds> {
    let mut all = None;
    let mut per_mode = Vec::new();
    for e in entries {
        let value = |v: &str| -> anyhow::Result<f64> {
            let x = fraction(v)?;
            if !(0.0..=1.0).contains(&x) {
                return Err(diffshield::Error::InvalidConfig(format!(
                    "--min-acc {e:?}: a threshold is a fraction in [0,1]"
                ))
                .into());
            }
            Ok(x)
        };
        match e.split_once('=') {
            Some((m, v)) => per_mode.push((m.parse::<AttackMode>()?, value(v)?)),
            None => all = Some(value(e)?),
        }
    }
    Ok((all, per_mode))
}

/// Runs `diffshield attack`.
pub fn attack(args: &AttackArgs) -> anyhow::Result<()> {
    let config = args.defense.resolve()?;
    let threats: Vec<ThreatModel> = if args.threat.is_empty() {
        ThreatModel::paper_defaults()
    } else {
        args.threat.iter().map(|t| t.parse()).collect::<Result<_, _>>()?
    };
    let modes: Vec<AttackMode> = args.mode.iter().map(|m| m.parse()).collect::<Result<_, _>>()?;
    if modes.is_empty() {
        return Err(
            diffshield::Error::InvalidConfig("--mode needs at least one mode".into()).into()
        );
    }
    if args.attack_batch == 0 {
        return Err(
            diffshield::Error::InvalidConfig("--attack-batch must be at least 1".into()).into()
        );
    }
    let harness = HarnessConfig {
        attack: match args.attack {
            AttackArg::Pgd => AttackKind::Pgd,
            AttackArg::Square => AttackKind::Square,
        },
        steps: args.steps,
        step_size: args.step_size.as_deref().map(fraction).transpose()?,
        eot: args.eot,
        queries: args.queries,
        runs: args.runs,
        seed: args.attack_seed,
        loss: match args.loss {
            LossArg::Ce => Loss::CrossEntropy,
            LossArg::Margin => Loss::Margin,
        },
        random_start: !args.no_random_start,
    };
    harness.validate()?;
    let (min_all, min_per_mode) = thresholds(&args.min_acc)?;

    let mut pipeline = Pipeline::from_config(&config)?;
    let set = read_cifar_bin(&args.data, Some(args.limit))?;
    let n = set.labels.len();
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let mut twins = load_twins(&config, &modes, harness.attack)?;
    let mut twins = Twins {
        classifier: twins.0.as_deref_mut().map(|c| c as _),
        denoiser: twins.1.as_deref_mut().map(|d| d as _),
    };

    let started = Instant::now();
    let fresh = {
        let clean = correct_runs(
            &mut pipeline,
            Evaluated::Defended,
            set.images.view(),
            &labels,
            harness.runs,
            0,
        )?;
        let clean = RunAccuracy::from_counts(&clean, harness.runs);
        let bare =
            correct_runs(&mut pipeline, Evaluated::Undefended, set.images.view(), &labels, 1, 0)?;
        AttackReport {
            data: args.data.display().to_string(),
            images: n,
            config: config.clone(),
            harness: harness.clone(),
            threats: threats.iter().map(|t| t.to_string()).collect(),
            modes: modes.clone(),
            counting: COUNTING.into(),
            clean_acc: clean.mean,
            clean_acc_worst: clean.worst,
            clean_acc_majority: clean.majority,
            undefended_clean_acc: RunAccuracy::from_counts(&bare, 1).mean,
            results: Vec::new(),
            summary: Vec::new(),
            complete: false,
            seconds: 0.0,
        }
    };
    let mut report = match (&args.out, args.resume) {
        (Some(path), true) if path.exists() => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let saved: AttackReport = serde_json::from_str(&text).map_err(|e| {
                diffshield::Error::InvalidConfig(format!(
                    "--resume: {} is not an attack report: {e}",
                    path.display()
                ))
            })?;
            saved.resumable_with(&fresh)?;
            // Keep the finished cells; the clean figures are those of the images now requested
            // (a larger --limit extends the run).
            AttackReport { results: saved.results, seconds: saved.seconds, ..fresh }
        }
        _ => fresh,
    };
    let seconds_before = report.seconds;

    let batches: Vec<(usize, usize)> =
        (0..n).step_by(args.attack_batch).map(|a| (a, (a + args.attack_batch).min(n))).collect();
    let bar = progress(threats.len() * modes.len() * batches.len(), "attack");
    for (ti, threat) in threats.iter().enumerate() {
        for (mi, &mode) in modes.iter().enumerate() {
            let name = threat.to_string();
            let cell_tag = (ti * AttackMode::ALL.len() + mi + 1) as u64;
            for &(a, b) in &batches {
                bar.set_message(format!("{mode} {name}"));
                if (a..b).all(|i| report.cell_mut(&name, mode).has(i)) {
                    bar.inc(1);
                    continue;
                }
                let t0 = Instant::now();
                let x = set.images.slice(s![a..b, .., .., ..]);
                let outcomes = run_cell(
                    &mut pipeline,
                    &mut twins,
                    &harness,
                    *threat,
                    mode,
                    x,
                    &labels[a..b],
                    a,
                    cell_tag,
                )?;
                report.cell_mut(&name, mode).add(
                    outcomes,
                    harness.runs,
                    t0.elapsed().as_secs_f64(),
                );
                report.seconds = seconds_before + started.elapsed().as_secs_f64();
                report.summarise(harness.runs);
                if let Some(path) = &args.out {
                    write_atomically(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    report.seconds = seconds_before + started.elapsed().as_secs_f64();
    report.summarise(harness.runs);
    for warning in report.sanity_checks() {
        eprintln!("sanity check: {warning}");
    }
    if let Some(path) = &args.out {
        write_atomically(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if let Some(path) = &args.markdown {
        write_atomically(path, report.markdown().as_bytes())?;
    }
    if let Some(path) = &args.junit {
        let lookup = |m: AttackMode, _: &str| {
            min_per_mode.iter().find(|(pm, _)| *pm == m).map(|&(_, v)| v).or(min_all)
        };
        write_atomically(path, report.junit(&lookup).as_bytes())?;
    }
    eprint!("{}", report.markdown());
    if args.json || args.out.is_none() {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// The differentiable classifier (and denoiser for white-box) the modes need.
type LoadedTwins = (
    Option<Box<dyn diffshield::grad::DifferentiableClassifier>>,
    Option<Box<dyn diffshield::grad::DifferentiableDenoiser>>,
);

#[cfg(feature = "twin")]
fn load_twins(
    config: &diffshield::config::DefenseConfig,
    modes: &[AttackMode],
    attack: AttackKind,
) -> anyhow::Result<LoadedTwins> {
    use diffshield::grad::burn_twin::{TwinClassifier, TwinDenoiser};
    if attack == AttackKind::Square {
        return Ok((None, None));
    }
    let manifest = diffshield::manifest::Manifest::load(&config.models)?;
    let classifier: Box<dyn diffshield::grad::DifferentiableClassifier> =
        Box::new(TwinClassifier::load(&manifest)?);
    let denoiser: Option<Box<dyn diffshield::grad::DifferentiableDenoiser>> =
        if modes.contains(&AttackMode::WhiteBox) {
            Some(Box::new(TwinDenoiser::load(&manifest, &config.denoiser)?))
        } else {
            None
        };
    Ok((Some(classifier), denoiser))
}

#[cfg(not(feature = "twin"))]
fn load_twins(
    _: &diffshield::config::DefenseConfig,
    _: &[AttackMode],
    _: AttackKind,
) -> anyhow::Result<LoadedTwins> {
    Ok((None, None))
}
