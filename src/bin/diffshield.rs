//! The diffshield command line: argument parsing and printing over the library's
//! [`diffshield::Defense`], attack suite and tuning sweep. Machine-readable JSON lines (or
//! `--format text`) on stdout, progress and errors on stderr. Exit codes: 0 success (also when
//! stdout is closed early, as by `| head`), 2 bad input or configuration, 1 internal failure or
//! an unwritable stdout.

#[path = "diffshield/attack_cmd.rs"]
mod attack_cmd;
#[path = "diffshield/device_check_cmd.rs"]
mod device_check_cmd;
#[path = "diffshield/gradcheck_cmd.rs"]
mod gradcheck_cmd;
#[path = "diffshield/output.rs"]
mod output;
#[path = "diffshield/progress.rs"]
mod progress;
#[path = "diffshield/tune_cmd.rs"]
mod tune_cmd;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use diffshield::config::BackendKind;
use diffshield::data::cifar::read_cifar_bin;
use diffshield::data::inputs::load_inputs;
use diffshield::defense::StreamOptions;
use diffshield::stream::{CifarSource, FolderSource, FrameSource, RawSource};
use diffshield::{Defense, DefenseConfig, Precision, VoteRule};
use output::{Format, Out};
use progress::Progress;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "diffshield",
    version,
    about = "Diffusion-purification defence for image classifiers",
    // `--t-star -1` is a bad value to name, not an unknown flag.
    allow_negative_numbers = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify PNG/JPEG/PPM files, folders of them, or a CIFAR-10 .bin; one line per image.
    Classify {
        /// Image files, folders (their images in name order) or CIFAR-10 .bin files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Classify at most this many images.
        #[arg(long)]
        limit: Option<usize>,
        /// Skip the purifier: the bare classifier's decision.
        #[arg(long)]
        no_purify: bool,
        /// Output: json (one object per line) or text (for people).
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        #[command(flatten)]
        defense: DefenseArgs,
    },
    /// Accuracy of the bare classifier and of the defended pipeline on a CIFAR-10 .bin file.
    Eval {
        /// CIFAR-10 binary file.
        #[arg(long)]
        data: PathBuf,
        /// Use only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        /// Measure only the bare classifier.
        #[arg(long)]
        no_purify: bool,
        /// Output: json (one object) or text (for people).
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        #[command(flatten)]
        defense: DefenseArgs,
    },
    /// Purify a training set (CIFAR-10 .bin or JPEG .pack) --draws times per image with the
    /// deployed plan, each draw its own noise, into shards a killed run resumes; the input of
    /// the classifier fine-tuning recipe (training.train_classifier --init-onnx, training/README).
    PurifySet {
        /// CIFAR-10 .bin or JPEG .pack (its training split, records with split byte 0).
        #[arg(long)]
        data: PathBuf,
        /// Output folder: manifest.json and shard_NNNNN.bin (CIFAR-10 records, image-major,
        /// --draws records per image). An existing one is resumed if made with the same settings.
        #[arg(long)]
        out: PathBuf,
        /// Purifications per image, each with its own noise.
        #[arg(long, default_value_t = 2)]
        draws: u32,
        /// Images per shard: what a killed run loses at most.
        #[arg(long, default_value_t = 500)]
        shard: usize,
        /// Use only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        defense: DefenseArgs,
    },
    /// Attack the deployed pipeline (PGD with the mode's gradient + EOT, or Square) and report
    /// robust accuracy over fresh-noise runs: JSON report, Table-2 Markdown, JUnit.
    Attack(Box<attack_cmd::AttackArgs>),
    /// Check the white-box gradients (classifier, one denoiser call, the whole purifier)
    /// against central finite differences; exit 1 above the tolerance.
    Gradcheck(Box<gradcheck_cmd::GradcheckArgs>),
    /// Sweep a grid of defence configurations: per point the latency of single defended frames,
    /// clean and robust accuracy; writes tune.csv, pareto.md, pareto.svg, depth.svg under --out
    /// (finished points are cached there, so a sweep resumes and extends).
    Tune(Box<tune_cmd::TuneArgs>),
    /// Check a backend (a GPU: --backend cuda) against the golden vectors, the CPU's accuracy,
    /// batch sizes; node placement and speed; one JSON line per check, exit 1 if one fails.
    DeviceCheck(Box<device_check_cmd::DeviceCheckArgs>),
    /// Classify a stream of frames (folder, raw RGB on stdin, CIFAR-10 .bin) at a target rate;
    /// one line per frame, then a summary line.
    Run {
        #[command(flatten)]
        source: StreamArgs,
        /// Output: json (one object per line) or text (for people).
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        #[command(flatten)]
        defense: DefenseArgs,
    },
}

/// Where a stream's frames come from and how fast.
#[derive(Args, Clone)]
struct StreamArgs {
    /// A folder of images, taken in file-name order.
    #[arg(long, group = "input")]
    folder: Option<PathBuf>,
    /// With --folder: keep watching for new files (stop with --limit or Ctrl-C).
    #[arg(long, requires = "folder")]
    watch: bool,
    /// Raw RGB8 frames of WIDTHxHEIGHT (interleaved, row-major) on stdin, e.g. 640x480.
    #[arg(long, group = "input", value_name = "WxH")]
    raw: Option<String>,
    /// A CIFAR-10 .bin file read as a stream.
    #[arg(long, group = "input")]
    data: Option<PathBuf>,
    /// Stop after N frames.
    #[arg(long)]
    limit: Option<u64>,
    /// Frames per second the source delivers (default: as fast as it can).
    #[arg(long)]
    rate: Option<f64>,
    /// Frames that may wait while one is processed; beyond it the oldest is dropped.
    #[arg(long, default_value_t = 4)]
    queue: usize,
}

/// Options of the defence; each overrides the same key of `--config`.
#[derive(Args, Clone)]
pub(crate) struct DefenseArgs {
    /// TOML file with any of the keys below (t_star, stride, eta, votes, ...); relative paths
    /// in it are relative to the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Diffusion depth T* (1..=500 for the shipped denoisers) [default: 140].
    #[arg(long)]
    t_star: Option<u32>,
    /// DDIM stride [default: 10].
    #[arg(long, conflicts_with_all = ["steps", "timesteps"])]
    stride: Option<u32>,
    /// Number of DDIM steps from T* to 0 (instead of --stride).
    #[arg(long, conflicts_with = "timesteps")]
    steps: Option<u32>,
    /// Explicit timesteps, comma-separated, strictly decreasing from T* (e.g. 140,100,60,20).
    #[arg(long, value_delimiter = ',')]
    timesteps: Option<Vec<u32>>,
    /// Fresh noise per DDIM step, 0..=1 [default: 1].
    #[arg(long)]
    eta: Option<f64>,
    /// Purifications per frame [default: 3].
    #[arg(long)]
    votes: Option<u32>,
    /// How votes combine: majority or mean-prob [default: majority].
    #[arg(long, value_enum)]
    vote_rule: Option<VoteRuleArg>,
    /// Noise seed, to replay a run exactly [default: a fresh seed from the OS, reported in
    /// every decision; attack, tune and gradcheck default to 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Denoiser tier from models/models.toml: s or m [default: s].
    #[arg(long)]
    denoiser: Option<String>,
    /// CPU threads for inference [default: one per CPU core this process may use].
    #[arg(long)]
    threads: Option<usize>,
    /// Inference backend: cpu, cuda (an NVIDIA GPU, builds with feature cuda; f32 only) or auto
    /// (cuda where usable, else cpu) [default: cpu].
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Model precision: f32 or int8 (the manifest's int8_file models) [default: f32].
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Frames per batch [default: 1].
    #[arg(long)]
    batch: Option<usize>,
    /// Folder with models.toml and the ONNX files [default: $DIFFSHIELD_MODELS, else the
    /// models folder diffshield was built from].
    #[arg(long)]
    models: Option<PathBuf>,
    /// Per-frame latency budget, milliseconds: steps and votes are planned per frame to fit.
    #[arg(long)]
    budget_ms: Option<f64>,
    /// Fewest DDIM steps the budget planner may choose [default: 1].
    #[arg(long)]
    min_steps: Option<usize>,
    /// Fewest votes the budget planner may choose (--votes is the most) [default: 1].
    #[arg(long)]
    min_votes: Option<u32>,
    /// Classes listed in each decision's top_k [default: 3].
    #[arg(long)]
    top_k: Option<usize>,
    /// Answer "unknown" (label null) when the chosen label's mean probability is below this
    /// fraction (config key min_confidence) [default: never].
    #[arg(long, value_name = "P")]
    abstain_below: Option<f32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    F32,
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum VoteRuleArg {
    Majority,
    MeanProb,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Cpu,
    Cuda,
    Auto,
}

impl DefenseArgs {
    /// The configuration file (if any) with the command-line options applied over it.
    pub(crate) fn resolve(&self) -> anyhow::Result<DefenseConfig> {
        let mut c = match &self.config {
            Some(p) => DefenseConfig::from_file(p)?,
            None => DefenseConfig::default(),
        };
        if self.stride.is_some() || self.steps.is_some() || self.timesteps.is_some() {
            // A sub-sequence given on the command line replaces the file's, whichever kind it was.
            c.stride = self.stride;
            c.steps = self.steps;
            c.timesteps = self.timesteps.clone();
        }
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f.clone() { c.$f = v; })* };
        }
        set!(t_star, eta, votes, denoiser, threads, batch, min_steps, min_votes, top_k);
        macro_rules! set_some {
            ($($f:ident),*) => { $(if self.$f.is_some() { c.$f = self.$f.clone(); })* };
        }
        set_some!(seed, models, budget_ms);
        if self.abstain_below.is_some() {
            c.min_confidence = self.abstain_below;
        }
        if let Some(r) = self.vote_rule {
            c.vote_rule = match r {
                VoteRuleArg::Majority => VoteRule::Majority,
                VoteRuleArg::MeanProb => VoteRule::MeanProb,
            };
        }
        if let Some(p) = self.precision {
            c.precision = match p {
                PrecisionArg::F32 => Precision::F32,
                PrecisionArg::Int8 => Precision::Int8,
            };
        }
        if let Some(b) = self.backend {
            c.backend = match b {
                BackendArg::Cpu => BackendKind::Cpu,
                BackendArg::Cuda => BackendKind::Cuda,
                BackendArg::Auto => BackendKind::Auto,
            };
        }
        c.validate()?;
        Ok(c)
    }
}

fn classify(
    inputs: &[PathBuf],
    limit: Option<usize>,
    no_purify: bool,
    format: Format,
    args: &DefenseArgs,
) -> anyhow::Result<()> {
    let mut defense = Defense::from_config(&args.resolve()?)?;
    // Every input is decoded and checked before the first line is printed, so a bad file
    // fails the command without leaving half an answer on stdout.
    let inputs = load_inputs(inputs, limit, defense.input_size())?;
    let mut bar = Progress::new(inputs.len(), "classify");
    let decisions = if no_purify {
        defense.classify_undefended(inputs.images.view())?
    } else {
        defense.classify_images_with(inputs.images.view(), &mut |d| bar.inc(d.len() as u64))?
    };
    bar.finish();
    let mut out = Out::new(format);
    for ((d, src), label) in decisions.iter().zip(&inputs.sources).zip(&inputs.labels) {
        out.decision(d, src, *label, None)?;
    }
    out.finish()
}

fn eval(
    data: &std::path::Path,
    limit: Option<usize>,
    no_purify: bool,
    format: Format,
    args: &DefenseArgs,
) -> anyhow::Result<()> {
    let mut defense = Defense::from_config(&args.resolve()?)?;
    let set = read_cifar_bin(data, limit)?;
    let mut bar = Progress::new(set.len(), "purified");
    let acc = defense.accuracy(set.images.view(), &set.labels, !no_purify, &mut |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish();
    let mut out = Out::new(format);
    out.eval(data, &acc, &defense)?;
    out.finish()
}

fn purify_set(
    data: &std::path::Path,
    out: &std::path::Path,
    draws: u32,
    shard: usize,
    limit: Option<usize>,
    args: &DefenseArgs,
) -> anyhow::Result<()> {
    if args.votes.is_some() || args.budget_ms.is_some() {
        return Err(diffshield::Error::InvalidConfig(
            "purify-set runs the full plan --draws times per image: no --votes or --budget-ms"
                .into(),
        )
        .into());
    }
    let spec = diffshield::purified_set::PurifiedSetSpec {
        source: data.into(),
        limit,
        out: out.into(),
        draws,
        shard_images: shard,
        defense: args.resolve()?,
    };
    use anyhow::Context as _;
    use std::io::Write as _;
    let start = std::time::Instant::now();
    let mut done = 0usize;
    let manifest = diffshield::purified_set::purify_set(&spec, &mut |s| {
        done += s.images;
        let what = if s.kept { "kept".to_string() } else { format!("{:.1} s", s.seconds) };
        eprintln!(
            "shard {}/{}: {} images x {draws} draws, {what} ({done} images, {:.0} s so far)",
            s.index + 1,
            s.of,
            s.images,
            start.elapsed().as_secs_f64()
        );
    })
    .with_context(|| format!("purifying {} into {}", data.display(), out.display()))?;
    // Written, not println!: a closed or full stdout is an error to report (or, closed early
    // by a reader, a quiet end), never a panic.
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{}: {} images x {} draws, denoiser {}, seed {}",
        out.display(),
        manifest.images,
        manifest.draws,
        manifest.denoiser,
        manifest.seed
    )
    .and_then(|()| stdout.flush())
    .map_err(|source| diffshield::Error::Io { path: "stdout".into(), source })?;
    Ok(())
}

fn frame_source(args: &StreamArgs, size: (usize, usize)) -> anyhow::Result<Box<dyn FrameSource>> {
    if args.watch && args.folder.is_none() {
        return Err(diffshield::Error::InvalidConfig("--watch watches a --folder".into()).into());
    }
    if let Some(folder) = &args.folder {
        if !folder.is_dir() {
            return Err(diffshield::Error::InvalidConfig(format!(
                "--folder {} is not a folder (classify takes single files)",
                folder.display()
            ))
            .into());
        }
        return Ok(Box::new(FolderSource::new(folder, args.watch)?.with_size(size)));
    }
    if let Some(data) = &args.data {
        return Ok(Box::new(CifarSource::open(data)?));
    }
    if let Some(raw) = &args.raw {
        let parsed =
            raw.split_once(['x', 'X']).and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
        let (w, h) = parsed.ok_or_else(|| {
            diffshield::Error::InvalidConfig(format!(
                "--raw takes WIDTHxHEIGHT, e.g. 640x480, got {raw:?}"
            ))
        })?;
        return Ok(Box::new(RawSource::new(std::io::stdin(), "stdin", w, h)?.with_size(size)));
    }
    Err(diffshield::Error::InvalidConfig("run needs one of --folder, --raw or --data".into())
        .into())
}

fn run(args: &StreamArgs, format: Format, defense: &DefenseArgs) -> anyhow::Result<()> {
    let mut defense = Defense::from_config(&defense.resolve()?)?;
    let source = frame_source(args, defense.input_size())?;
    // SIGINT and SIGTERM stop the stream after the frame in progress, with its summary.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        log::warn!("no SIGINT/SIGTERM handler ({e}): a signal ends the run without its summary");
    }
    let options = StreamOptions {
        rate_hz: args.rate,
        limit: args.limit,
        queue: args.queue,
        stop: Some(stop),
    };
    let mut out = Out::new(format);
    let outcome = defense.run_stream(source, &options, &mut |s| {
        out.decision(&s.decision, &s.source, s.true_label, Some((s.latency_ms, s.queued_ms)))
    });
    // The summary is printed even when the stream failed part-way, so that a reader knows how
    // far it got; the error follows.
    match outcome {
        Ok(o) => {
            out.summary(&o.latency, o.seed)?;
            out.finish()
        }
        Err(failure) => {
            if let (Some(partial), false) =
                (&failure.partial, output::is_stdout_error(&failure.error))
            {
                out.summary(&partial.latency, partial.seed)?;
                out.finish()?;
            }
            Err(failure.error.into())
        }
    }
}

/// Lets every option that takes a value take a negative number (`--budget-ms -5`), in every
/// subcommand: clap would otherwise read `-5` as an unknown flag and suggest `-- -5`, which
/// makes it an input path; with it, the value reaches the check that names the allowed range.
/// Whole-number options get [`whole_number`]'s messages.
fn numeric_options(cmd: clap::Command) -> clap::Command {
    use std::any::TypeId;
    cmd.mut_args(|a| {
        let takes = a.get_action().takes_values() && !a.is_positional();
        if !takes {
            return a;
        }
        let a = a.allow_negative_numbers(true);
        let parses = a.get_value_parser().type_id();
        if parses == TypeId::of::<u32>() {
            a.value_parser(whole_number::<u32>(u32::MAX.into()))
        } else if parses == TypeId::of::<u64>() {
            a.value_parser(whole_number::<u64>(u64::MAX))
        } else if parses == TypeId::of::<usize>() {
            a.value_parser(whole_number::<usize>(usize::MAX as u64))
        } else {
            a
        }
    })
    .mut_subcommands(numeric_options)
}

/// The parser of an option that takes a whole number up to `max`, with a message that says
/// what is wrong: clap's own answered `--threads -1` with "invalid digit found in string".
fn whole_number<T>(max: u64) -> clap::builder::ValueParser
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    clap::builder::ValueParser::new(move |text: &str| -> Result<T, String> {
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let too_large = || format!("more than {max}, the most it takes");
        match text.parse::<u64>() {
            Ok(v) => T::try_from(v).map_err(|_| too_large()),
            Err(_) if text.strip_prefix('-').is_some_and(digits) => {
                Err("negative, where a whole number (0, 1, 2, ...) is needed".into())
            }
            Err(_) if digits(text) => Err(too_large()),
            Err(_) => Err("not a whole number (digits only, e.g. 8)".into()),
        }
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // This process is ours: freed activations stay mapped (fewer page faults per model call).
    if !diffshield::memory::keep_freed_memory() {
        log::debug!("the C library's allocator keeps its own settings (not glibc)");
    }
    let cli = match Cli::from_arg_matches(&numeric_options(Cli::command()).get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.format(&mut Cli::command()).exit(),
    };
    let result = match &cli.command {
        Command::Classify { inputs, limit, no_purify, format, defense } => {
            classify(inputs, *limit, *no_purify, *format, defense)
        }
        Command::Eval { data, limit, no_purify, format, defense } => {
            eval(data, *limit, *no_purify, *format, defense)
        }
        Command::Run { source, format, defense } => run(source, *format, defense),
        Command::PurifySet { data, out, draws, shard, limit, defense } => {
            purify_set(data, out, *draws, *shard, *limit, defense)
        }
        Command::Tune(args) => tune_cmd::tune(args),
        Command::Attack(args) => attack_cmd::attack(args),
        Command::Gradcheck(args) => gradcheck_cmd::gradcheck(args),
        Command::DeviceCheck(args) => device_check_cmd::device_check(args),
    };
    output::exit_code(result)
}
