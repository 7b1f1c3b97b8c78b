//! `diffshield attack`: the options of an attack suite; the runner (cells, batches, saving,
//! resume, outputs) is the library's `diffshield::attack::suite`.

use super::{DefenseArgs, Progress};
use clap::{Args, ValueEnum};
use diffshield::attack::gradients::AttackMode;
use diffshield::attack::harness::HarnessConfig;
use diffshield::attack::suite::{run_suite, Suite, SuiteOutputs, Thresholds};
use diffshield::attack::{parse_fraction, AttackKind, ThreatModel};
use diffshield::grad::Loss;
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
enum AttackArg {
    /// Projected gradient descent along the mode's gradient.
    Pgd,
    /// Gradient-free Square Attack on the pipeline's outputs.
    Square,
    /// APGD (Croce & Hein 2020) along the mode's gradient with --loss.
    Apgd,
    /// AutoAttack's rand version: APGD-CE and APGD-DLR with EOT, per image the worst.
    AaRand,
}

#[derive(Clone, Copy, ValueEnum)]
enum LossArg {
    /// Cross-entropy of the true label.
    Ce,
    /// Best other logit minus the true logit.
    Margin,
    /// Croce & Hein's difference of logits ratio.
    Dlr,
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
    /// Gradient steps of PGD and APGD (`--steps` is the purifier's DDIM step count, as in the
    /// other commands).
    #[arg(long = "pgd-steps", default_value_t = 20)]
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

/// Runs `diffshield attack`.
pub fn attack(args: &AttackArgs) -> anyhow::Result<()> {
    let config = args.defense.resolve()?;
    let threats: Vec<ThreatModel> = if args.threat.is_empty() {
        ThreatModel::paper_defaults()
    } else {
        args.threat.iter().map(|t| t.parse()).collect::<Result<_, _>>()?
    };
    let modes: Vec<AttackMode> = args.mode.iter().map(|m| m.parse()).collect::<Result<_, _>>()?;
    let twice = |names: Vec<String>| -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        match names.into_iter().find(|n| !seen.insert(n.clone())) {
            Some(n) => Err(diffshield::Error::InvalidConfig(format!("{n} is given twice")).into()),
            None => Ok(()),
        }
    };
    twice(threats.iter().map(|t| format!("--threat {t}")).collect())?;
    twice(modes.iter().map(|m| format!("--mode {m}")).collect())?;
    let suite = Suite {
        data: args.data.clone(),
        limit: args.limit,
        threats,
        modes,
        harness: HarnessConfig {
            attack: match args.attack {
                AttackArg::Pgd => AttackKind::Pgd,
                AttackArg::Square => AttackKind::Square,
                AttackArg::Apgd => AttackKind::Apgd,
                AttackArg::AaRand => AttackKind::AaRand,
            },
            steps: args.steps,
            step_size: args.step_size.as_deref().map(parse_fraction).transpose()?,
            eot: args.eot,
            queries: args.queries,
            runs: args.runs,
            seed: args.attack_seed,
            loss: match args.loss {
                LossArg::Ce => Loss::CrossEntropy,
                LossArg::Margin => Loss::Margin,
                LossArg::Dlr => Loss::Dlr,
            },
            random_start: !args.no_random_start,
        },
        batch: args.attack_batch,
    };
    let outputs = SuiteOutputs {
        report: args.out.clone(),
        resume: args.resume,
        markdown: args.markdown.clone(),
        junit: args.junit.clone(),
        min_acc: Thresholds::parse(&args.min_acc)?,
    };
    let mut bar = None;
    let outcome = run_suite(&config, &suite, &outputs, &mut |p| {
        let bar = bar.get_or_insert_with(|| Progress::new(p.total, "attack"));
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} {}", p.mode, p.threat));
    })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    for warning in &outcome.warnings {
        eprintln!("sanity check: {warning}");
    }
    eprint!("{}", outcome.markdown);
    if args.json || args.out.is_none() {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", serde_json::to_string(&outcome.report)?)
            .and_then(|()| stdout.flush())
            .map_err(|source| diffshield::Error::Io { path: "stdout".into(), source })?;
    }
    if !outcome.below.is_empty() {
        return Err(diffshield::Error::CheckFailed(format!(
            "robust accuracy below --min-acc: {}",
            outcome.below.join(", ")
        ))
        .into());
    }
    Ok(())
}
