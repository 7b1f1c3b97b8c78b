//! `diffshield attack`: the options of an attack suite; the runner (cells, batches, saving,
//! resume, outputs) is the library's `diffshield::attack::suite`.

use super::{DefenseArgs, Progress};
use clap::{Args, ValueEnum};
use diffshield::attack::gradients::AttackMode;
use diffshield::attack::harness::{AttackSpec, HarnessConfig};
use diffshield::attack::protocol::{self, Protocol};
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

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// The seed paper's Table 2: four threat models; grey-box, BPDA, white-box; PGD-20, EOT 8.
    Paper,
    /// Exact gradients: aa-rand + PGD-200 (+ PGD-1), EOT 20, 10 runs, white-box and
    /// known-noise, Linf 8/255, with the unbounded-eps probe.
    Strict,
}

/// Options of `diffshield attack`. With `--protocol`, every option not given takes the
/// protocol's value; the others take the defaults shown.
#[derive(Args)]
pub struct AttackArgs {
    /// CIFAR-10 binary file.
    #[arg(long)]
    data: PathBuf,
    /// Attack the first N images.
    #[arg(long, default_value_t = 16)]
    limit: usize,
    /// Start from a protocol preset (any option below overrides its part of it).
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
    /// Threat models, e.g. linf:8/255,l2:1.0 [default: the paper's four].
    #[arg(long, value_delimiter = ',')]
    threat: Vec<String>,
    /// Modes: undefended, grey-box, bpda, white-box, known-noise (comma-separated)
    /// [default: white-box].
    #[arg(long, value_delimiter = ',')]
    mode: Vec<String>,
    /// Crafting attacks, comma-separated; per image the worst counts [default: pgd].
    #[arg(long, value_enum, value_delimiter = ',')]
    attack: Vec<AttackArg>,
    /// Gradient steps of PGD and APGD, for every iterative attack (`--steps` is the purifier's
    /// DDIM step count, as in the other commands) [default: 20].
    #[arg(long)]
    pgd_steps: Option<usize>,
    /// PGD step size in [0,1] pixel units, e.g. 2/255 [default: eps/4 for Linf, 2.5 eps/steps
    /// for L2, eps for one step].
    #[arg(long)]
    step_size: Option<String>,
    /// Purification samples averaged per gradient (BPDA and white-box) [default: 8].
    #[arg(long)]
    eot: Option<u32>,
    /// Square's query budget per image.
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// Evaluation runs with fresh noise per adversarial image [default: 5].
    #[arg(long)]
    runs: Option<u32>,
    /// Loss PGD and APGD ascend, also a preset's [default: ce, or the preset's] (square has its
    /// own margin loss, aa-rand runs both CE and DLR).
    #[arg(long, value_enum)]
    loss: Option<LossArg>,
    /// Start PGD at the clean image instead of a random point of the ball.
    #[arg(long)]
    no_random_start: bool,
    /// Run the unbounded-eps probe (on with --protocol strict).
    #[arg(long)]
    sanity_probe: bool,
    /// Do not run the unbounded-eps probe.
    #[arg(long, conflicts_with = "sanity_probe")]
    no_sanity_probe: bool,
    /// Images attacked together (one saved batch).
    #[arg(long, default_value_t = 8)]
    attack_batch: usize,
    /// Where the differentiable twins compute gradients: cpu (burn flex) or wgpu (a GPU's
    /// Vulkan driver, or lavapipe; builds with --features wgpu). Accuracies are measured on
    /// the deployed backend either way.
    #[arg(long, default_value = "cpu")]
    grad_device: String,
    /// Seed of the attack's randomness (random start, EOT noise, Square).
    #[arg(long, default_value_t = 0)]
    attack_seed: u64,
    /// Write the JSON report here (atomically, after every finished batch).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in --out (same settings) instead of starting over.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Write the Markdown tables (the paper's Table 2 layout, then per attack) here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write JUnit XML here: one test case per (threat, mode), failing below --min-acc, and one
    /// per sanity check, failing when it failed; the command then exits 1.
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
    let protocol = args.protocol.map(|p| match p {
        ProtocolArg::Paper => Protocol::Paper,
        ProtocolArg::Strict => Protocol::Strict,
    });
    let preset = protocol.map(Protocol::preset);
    let threats: Vec<ThreatModel> = if !args.threat.is_empty() {
        args.threat.iter().map(|t| t.parse()).collect::<Result<_, _>>()?
    } else if let Some(p) = &preset {
        p.threats.clone()
    } else {
        ThreatModel::paper_defaults()
    };
    let modes: Vec<AttackMode> = if !args.mode.is_empty() {
        args.mode.iter().map(|m| m.parse()).collect::<Result<_, _>>()?
    } else if let Some(p) = &preset {
        p.modes.clone()
    } else {
        vec![AttackMode::WhiteBox]
    };
    let twice = |names: Vec<String>| -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        match names.into_iter().find(|n| !seen.insert(n.clone())) {
            Some(n) => Err(diffshield::Error::InvalidConfig(format!("{n} is given twice")).into()),
            None => Ok(()),
        }
    };
    twice(threats.iter().map(|t| format!("--threat {t}")).collect())?;
    twice(modes.iter().map(|m| format!("--mode {m}")).collect())?;
    let loss = args.loss.map(|l| match l {
        LossArg::Ce => Loss::CrossEntropy,
        LossArg::Margin => Loss::Margin,
        LossArg::Dlr => Loss::Dlr,
    });
    let step_size = args.step_size.as_deref().map(parse_fraction).transpose()?;
    let mut attacks: Vec<AttackSpec> = if !args.attack.is_empty() {
        let steps = args.pgd_steps.unwrap_or(20);
        args.attack
            .iter()
            .map(|a| {
                let kind = match a {
                    AttackArg::Pgd => AttackKind::Pgd,
                    AttackArg::Square => AttackKind::Square,
                    AttackArg::Apgd => AttackKind::Apgd,
                    AttackArg::AaRand => AttackKind::AaRand,
                };
                AttackSpec::of_kind(
                    kind,
                    steps,
                    step_size,
                    Loss::CrossEntropy,
                    args.queries,
                    !args.no_random_start,
                )
            })
            .collect()
    } else if let Some(p) = &preset {
        p.attacks.clone()
    } else {
        let steps = args.pgd_steps.unwrap_or(20);
        vec![AttackSpec::pgd(steps, step_size, Loss::CrossEntropy, !args.no_random_start)]
    };
    if let Some(steps) = args.pgd_steps {
        protocol::override_steps(&mut attacks, steps);
    }
    if let Some(size) = step_size {
        protocol::override_step_size(&mut attacks, size);
    }
    // A loss no chosen attack ascends would be recorded in the report as if it had been used.
    if loss.is_some_and(|l| protocol::override_loss(&mut attacks, l) == 0) {
        return Err(diffshield::Error::InvalidConfig(
            "--loss: no chosen attack takes a loss (square has its own margin loss, aa-rand \
             runs both CE and DLR); add --attack pgd or apgd"
                .into(),
        )
        .into());
    }
    let suite = Suite {
        data: args.data.clone(),
        limit: args.limit,
        threats,
        modes,
        harness: HarnessConfig {
            attacks,
            eot: args.eot.or(preset.as_ref().map(|p| p.eot)).unwrap_or(8),
            runs: args.runs.or(preset.as_ref().map(|p| p.runs)).unwrap_or(5),
            seed: args.attack_seed,
        },
        batch: args.attack_batch,
        protocol,
        grad_device: args.grad_device.parse()?,
        unbounded_probe: !args.no_sanity_probe
            && (args.sanity_probe || preset.as_ref().is_some_and(|p| p.unbounded_probe)),
    };
    let outputs = SuiteOutputs {
        report: args.out.clone(),
        resume: args.resume,
        markdown: args.markdown.clone(),
        junit: args.junit.clone(),
        min_acc: Thresholds::parse(&args.min_acc)?,
        inputs: args.defense.config.iter().cloned().collect(),
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
    if args.junit.is_some() && !outcome.warnings.is_empty() {
        return Err(diffshield::Error::CheckFailed(format!(
            "sanity checks failed (see the JUnit file): {}",
            outcome.warnings.join("; ")
        ))
        .into());
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
