//! The diffshield command line: classify images through the purification defence, evaluate
//! accuracy on a CIFAR-10 binary file. Machine-readable JSON on stdout, progress and errors on
//! stderr. Exit codes: 0 success, 2 bad input or configuration, 1 internal failure.

#[path = "diffshield/attack_cmd.rs"]
mod attack_cmd;
#[path = "diffshield/gradcheck_cmd.rs"]
mod gradcheck_cmd;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use diffshield::config::{BackendKind, DefenseConfig, VoteRule};
use diffshield::data::cifar::{is_cifar_bin, read_cifar_bin};
use diffshield::data::image::{collect_image_paths, load_image};
use diffshield::pipeline::{Budget, Decision, Pipeline};
use diffshield::stream::{
    spawn_producer, CifarSource, FolderSource, FrameQueue, FrameSource, LatencySummary, RawSource,
};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array4, Axis};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "diffshield",
    version,
    about = "Diffusion-purification defence for image classifiers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify PNG/JPEG/PPM files, folders of them, or a CIFAR-10 .bin; one JSON line per image.
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
    Tune(Box<TuneArgs>),
    /// Classify a stream of frames (folder, raw RGB on stdin, CIFAR-10 .bin) at a target rate;
    /// one JSON line per frame, then a summary line.
    Run {
        #[command(flatten)]
        source: StreamArgs,
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
struct DefenseArgs {
    /// TOML file with any of the keys below (t_star, stride, eta, votes, ...).
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
    /// Purifications per frame [default: 1].
    #[arg(long)]
    votes: Option<u32>,
    /// How votes combine: majority or mean-prob [default: majority].
    #[arg(long, value_enum)]
    vote_rule: Option<VoteRuleArg>,
    /// Seed of the noise streams [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Denoiser tier from models/models.toml: s or m [default: s].
    #[arg(long)]
    denoiser: Option<String>,
    /// CPU threads for inference [default: 1].
    #[arg(long)]
    threads: Option<usize>,
    /// Inference backend [default: cpu].
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Model precision: f32 or int8 (the manifest's int8_file models) [default: f32].
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Frames per batch [default: 1].
    #[arg(long)]
    batch: Option<usize>,
    /// Folder with models.toml and the ONNX files [default: models].
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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    Int8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VoteRuleArg {
    Majority,
    MeanProb,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Cpu,
    Cuda,
}

impl DefenseArgs {
    /// The configuration file (if any) with the command-line options applied over it.
    fn resolve(&self) -> anyhow::Result<DefenseConfig> {
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
        set!(t_star, eta, votes, seed, denoiser, threads, batch, models, min_steps, min_votes);
        if self.budget_ms.is_some() {
            c.budget_ms = self.budget_ms;
        }
        if let Some(r) = self.vote_rule {
            c.vote_rule = match r {
                VoteRuleArg::Majority => VoteRule::Majority,
                VoteRuleArg::MeanProb => VoteRule::MeanProb,
            };
        }
        if let Some(p) = self.precision {
            c.precision = match p {
                PrecisionArg::F32 => diffshield::config::Precision::F32,
                PrecisionArg::Int8 => diffshield::config::Precision::Int8,
            };
        }
        if let Some(b) = self.backend {
            c.backend = match b {
                BackendArg::Cpu => BackendKind::Cpu,
                BackendArg::Cuda => BackendKind::Cuda,
            };
        }
        c.validate()?;
        Ok(c)
    }
}

/// Images to classify, with where each came from and its label when known.
struct Batch {
    images: Array4<f32>,
    sources: Vec<String>,
    labels: Vec<Option<u8>>,
}

fn load_inputs(
    inputs: &[PathBuf],
    limit: Option<usize>,
    size: (usize, usize),
) -> anyhow::Result<Batch> {
    let mut images = Vec::new();
    let mut sources = Vec::new();
    let mut labels = Vec::new();
    let remaining = |n: usize| limit.map(|l| l.saturating_sub(n));
    for input in inputs {
        if remaining(images.len()) == Some(0) {
            break;
        }
        if input.is_file() && is_cifar_bin(input) {
            let set = read_cifar_bin(input, remaining(images.len()))?;
            for (i, (img, l)) in set.images.outer_iter().zip(&set.labels).enumerate() {
                images.push(img.to_owned());
                sources.push(format!("{}#{i}", input.display()));
                labels.push(Some(*l));
            }
            continue;
        }
        for path in collect_image_paths(std::slice::from_ref(input))? {
            if remaining(images.len()) == Some(0) {
                break;
            }
            images.push(load_image(&path, size)?);
            sources.push(path.display().to_string());
            labels.push(None);
        }
    }
    let views: Vec<_> = images.iter().map(|a| a.view()).collect();
    let images = ndarray::stack(Axis(0), &views).context("stacking images")?;
    Ok(Batch { images, sources, labels })
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// How a batch of frames goes through the pipeline.
enum Mode<'a> {
    /// The bare classifier.
    Undefended,
    /// The full configured plan.
    Defended,
    /// One frame at a time under a latency budget.
    Budgeted(&'a Budget),
}

impl Mode<'_> {
    /// Decisions for `frames` (one frame at a time when budgeted), frame i being `first + i`.
    fn decide(
        &self,
        pipeline: &mut Pipeline,
        frames: ndarray::ArrayView4<f32>,
        first: u64,
    ) -> diffshield::Result<Vec<Decision>> {
        match self {
            Mode::Undefended => pipeline.decide_undefended(frames, first),
            Mode::Defended => pipeline.decide(frames, first),
            Mode::Budgeted(budget) => Ok(vec![pipeline.decide_within(frames, first, budget)?]),
        }
    }
}

/// The defended mode a configuration asks for; under a budget the pipeline is calibrated first
/// (which refuses a budget that cannot fit one step).
fn defended_mode<'a>(
    pipeline: &mut Pipeline,
    budget: Option<&'a Budget>,
) -> diffshield::Result<Mode<'a>> {
    match budget {
        Some(b) => {
            pipeline.calibrate(b, [3, 32, 32])?;
            Ok(Mode::Budgeted(b))
        }
        None => Ok(Mode::Defended),
    }
}

/// Runs the pipeline over `images` in batches of `batch` frames (1 under a budget).
fn run_batches(
    pipeline: &mut Pipeline,
    images: &Array4<f32>,
    batch: usize,
    mode: Mode,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Decision>> {
    let mut out = Vec::with_capacity(images.shape()[0]);
    let batch = if matches!(mode, Mode::Budgeted(_)) { 1 } else { batch };
    for (b, chunk) in images.axis_chunks_iter(Axis(0), batch).enumerate() {
        let first = (b * batch) as u64;
        let d = mode.decide(pipeline, chunk, first)?;
        bar.inc(d.len() as u64);
        out.extend(d);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn classify(
    inputs: &[PathBuf],
    limit: Option<usize>,
    no_purify: bool,
    args: &DefenseArgs,
) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let mut pipeline = Pipeline::from_config(&config)?;
    // Every input is decoded and checked before the first line is printed, so a bad file
    // fails the command without leaving half an answer on stdout.
    let batch = load_inputs(inputs, limit, (32, 32))?;
    let bar = progress(batch.sources.len(), "classify");
    let budget = config.budget(pipeline.plan().steps().len());
    let mode =
        if no_purify { Mode::Undefended } else { defended_mode(&mut pipeline, budget.as_ref())? };
    let decisions = run_batches(&mut pipeline, &batch.images, config.batch, mode, &bar)?;
    let mut stdout = std::io::stdout().lock();
    for ((d, src), label) in decisions.iter().zip(&batch.sources).zip(&batch.labels) {
        let mut line = serde_json::to_value(d)?;
        line["source"] = json!(src);
        if let Some(l) = label {
            line["true_label"] = json!(l);
        }
        writeln!(stdout, "{line}")?;
    }
    Ok(())
}

fn accuracy(decisions: &[Decision], labels: &[u8]) -> f64 {
    let ok = decisions.iter().zip(labels).filter(|(d, &l)| d.label == l as usize).count();
    ok as f64 / labels.len().max(1) as f64
}

fn eval(
    data: &std::path::Path,
    limit: Option<usize>,
    no_purify: bool,
    args: &DefenseArgs,
) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let mut pipeline = Pipeline::from_config(&config)?;
    let set = read_cifar_bin(data, limit)?;
    let n = set.labels.len();
    let t0 = Instant::now();
    let clean =
        run_batches(&mut pipeline, &set.images, 100, Mode::Undefended, &progress(n, "clean"))?;
    let clean_s = t0.elapsed().as_secs_f64();
    let mut report = json!({
        "data": data.display().to_string(),
        "images": n,
        "clean_acc": accuracy(&clean, &set.labels),
        "purified_acc": null,
        "config": config,
        "plan_timesteps": pipeline.plan().timesteps(),
        "seconds": { "clean": clean_s, "purified": null },
    });
    if !no_purify {
        let t1 = Instant::now();
        let bar = progress(n, "purified");
        let budget = config.budget(pipeline.plan().steps().len());
        let mode = defended_mode(&mut pipeline, budget.as_ref())?;
        let defended = run_batches(&mut pipeline, &set.images, config.batch, mode, &bar)?;
        if budget.is_some() {
            let missed = defended.iter().filter(|d| d.deadline_met == Some(false)).count();
            let steps: usize = defended.iter().map(|d| d.steps).sum();
            report["deadline_missed"] = json!(missed);
            report["mean_steps"] = json!(steps as f64 / n.max(1) as f64);
        }
        report["purified_acc"] = json!(accuracy(&defended, &set.labels));
        report["seconds"]["purified"] = json!(t1.elapsed().as_secs_f64());
    }
    println!("{report}");
    Ok(())
}

fn frame_source(args: &StreamArgs) -> anyhow::Result<Box<dyn FrameSource>> {
    if let Some(folder) = &args.folder {
        return Ok(Box::new(FolderSource::new(folder, args.watch)?));
    }
    if let Some(data) = &args.data {
        return Ok(Box::new(CifarSource::open(data)?));
    }
    if let Some(size) = &args.raw {
        let parsed =
            size.split_once(['x', 'X']).and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
        let (w, h) = parsed.ok_or_else(|| {
            diffshield::Error::InvalidConfig(format!(
                "--raw takes WIDTHxHEIGHT, e.g. 640x480, got {size:?}"
            ))
        })?;
        return Ok(Box::new(RawSource::new(std::io::stdin(), "stdin", w, h)?));
    }
    Err(diffshield::Error::InvalidConfig("run needs one of --folder, --raw or --data".into())
        .into())
}

fn run(args: &StreamArgs, defense: &DefenseArgs) -> anyhow::Result<()> {
    let config = defense.resolve()?;
    let mut pipeline = Pipeline::from_config(&config)?;
    let budget = config.budget(pipeline.plan().steps().len());
    let mode = defended_mode(&mut pipeline, budget.as_ref())?;
    let source = frame_source(args)?;
    let queue = Arc::new(FrameQueue::new(args.queue)?);
    let producer = spawn_producer(source, args.rate, args.limit, Arc::clone(&queue));
    let mut latencies = Vec::new();
    let mut missed = 0u64;
    let mut stdout = std::io::stdout().lock();
    let mut outcome = Ok(());
    while let Some(frame) = queue.pop() {
        let started = Instant::now();
        let x = frame.image.view().insert_axis(Axis(0));
        let d = match mode.decide(&mut pipeline, x, frame.index) {
            Ok(mut d) => d.remove(0),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        let latency = started.elapsed().as_secs_f64();
        latencies.push(latency);
        if d.deadline_met == Some(false) {
            missed += 1;
        }
        let mut line = serde_json::to_value(&d)?;
        line["source"] = json!(frame.source);
        line["latency_ms"] = json!(latency * 1e3);
        line["queued_ms"] = json!((started - frame.arrived).as_secs_f64() * 1e3);
        if let Some(l) = frame.label {
            line["true_label"] = json!(l);
        }
        writeln!(stdout, "{line}")?;
    }
    queue.close();
    let produced = producer.join().map_err(|_| anyhow::anyhow!("frame reader thread panicked"))?;
    let summary = LatencySummary::from_latencies(&latencies, missed, queue.dropped());
    writeln!(stdout, "{}", serde_json::to_string(&summary)?)?;
    outcome?;
    produced?;
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place, so a reader
/// (or a killed run) never sees a partial file.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir =
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().context("--out needs a file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Options of `diffshield tune`.
#[derive(Args, Clone)]
struct TuneArgs {
    /// CIFAR-10 binary file the images come from.
    #[arg(long, required_unless_present = "print_grid")]
    data: Option<PathBuf>,
    /// Output folder: points/ (the per-point cache), tune.csv, pareto.md, pareto.svg, depth.svg.
    #[arg(long, default_value = "target/tune")]
    out: PathBuf,
    /// TOML grid file: axes as lists, one table or several [[grid]] tables (their union)
    /// [default: the built-in grid, see --print-grid].
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Print the built-in grid (TOML) and exit.
    #[arg(long)]
    print_grid: bool,
    /// T* values, e.g. 20,60,100,140 (replaces the axis in every grid of --grid).
    #[arg(long, value_name = "LIST")]
    t_star: Option<String>,
    /// DDIM strides, e.g. 10,20 (with --steps: both kinds of plan are swept).
    #[arg(long, value_name = "LIST")]
    stride: Option<String>,
    /// DDIM step counts, e.g. 1,4.
    #[arg(long, value_name = "LIST")]
    steps: Option<String>,
    /// eta values, e.g. 0,1.
    #[arg(long, value_name = "LIST")]
    eta: Option<String>,
    /// Votes per frame, e.g. 1,3.
    #[arg(long, value_name = "LIST")]
    votes: Option<String>,
    /// Denoiser tiers, e.g. s,m.
    #[arg(long, value_name = "LIST")]
    denoiser: Option<String>,
    /// CPU thread counts, e.g. 1,2.
    #[arg(long, value_name = "LIST")]
    threads: Option<String>,
    /// Images of the clean pass; each is one timed single-frame decision (the latency samples).
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_IMAGES)]
    images: usize,
    /// Untimed single-frame decisions before the timed ones.
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_WARMUP)]
    warmup: usize,
    /// Attack for robust accuracy: bpda (PGD with BPDA+EOT; the default), square or none. A
    /// build without the `twin` feature has no bpda and defaults to square.
    #[arg(long, default_value = diffshield::tune::DEFAULT_ATTACK)]
    attack: String,
    /// Threat model of the attack.
    #[arg(long, default_value = "linf:8/255")]
    threat: String,
    /// Query budget per attacked image (square).
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_QUERIES)]
    queries: usize,
    /// PGD steps of the bpda attack.
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_PGD_STEPS)]
    pgd_steps: usize,
    /// Purification samples per bpda gradient.
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_EOT)]
    eot: u32,
    /// Images attacked (the first N of --data).
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_ATTACK_IMAGES)]
    attack_images: usize,
    /// Fresh-noise evaluations of each adversarial image.
    #[arg(long, default_value_t = diffshield::tune::DEFAULT_RUNS)]
    runs: u32,
    /// List the points and which are cached; measure nothing.
    #[arg(long)]
    dry_run: bool,
    /// Latency for the frontier and plot: cpu (the deciding thread's CPU time, steady when
    /// other jobs share the machine), wall, or auto (cpu when every point has it).
    #[arg(long, default_value = "auto")]
    clock: String,
    /// Base configuration (TOML, the keys of --config elsewhere) for what the grid does not set:
    /// models, vote_rule, seed, ...
    #[arg(long)]
    config: Option<PathBuf>,
    /// Noise seed [default: 0, or the --config file's].
    #[arg(long)]
    seed: Option<u64>,
    /// Folder with models.toml and the ONNX files [default: models].
    #[arg(long)]
    models: Option<PathBuf>,
}

fn tune(args: &TuneArgs) -> anyhow::Result<()> {
    use diffshield::tune::{self, grid::Grid, grid::GridAxes, Progress};
    if args.print_grid {
        print!("{}", tune::grid::DEFAULT_GRID_TOML.trim_start());
        return Ok(());
    }
    let mut axes = GridAxes::default();
    for (name, list) in [
        ("t_star", &args.t_star),
        ("stride", &args.stride),
        ("steps", &args.steps),
        ("eta", &args.eta),
        ("votes", &args.votes),
        ("denoiser", &args.denoiser),
        ("threads", &args.threads),
    ] {
        if let Some(list) = list {
            axes.set(name, list)?;
        }
    }
    let file = args.grid.as_deref().map(Grid::from_file).transpose()?;
    let grid = Grid::resolve(file, &axes)?;
    let mut base = match &args.config {
        Some(p) => DefenseConfig::from_file(p)?,
        None => DefenseConfig::default(),
    };
    if let Some(s) = args.seed {
        base.seed = s;
    }
    if let Some(m) = &args.models {
        base.models = m.clone();
    }
    let data = args.data.clone().context("--data is required")?;
    let settings = tune::MeasureSettings {
        data,
        clean_images: args.images,
        warmup: args.warmup,
        attack: tune::AttackSettings {
            kind: args.attack.parse()?,
            threat: args.threat.parse()?,
            queries: args.queries,
            pgd_steps: args.pgd_steps,
            eot: args.eot,
            images: args.attack_images,
            runs: args.runs,
        },
        base,
        clock: args.clock.parse()?,
    };
    let started = Instant::now();
    let mut report = |p: Progress| match p {
        Progress::Cached { index, total, point } => {
            eprintln!("[{}/{total}] {}: cached", index + 1, point.label());
        }
        Progress::Measuring { index, total, point } => {
            eprintln!(
                "[{}/{total}] {}: measuring ({:.0} s so far)",
                index + 1,
                point.label(),
                started.elapsed().as_secs_f64()
            );
        }
        Progress::Done { index, total, result: r } => {
            eprintln!(
                "[{}/{total}] {}: p50 {:.1} ms, p99 {:.1} ms, clean {:.1} %, robust {} ({:.1} s)",
                index + 1,
                r.label,
                r.latency.p50_ms,
                r.latency.p99_ms,
                r.clean_acc * 100.0,
                r.robust.as_ref().map_or("n/a".into(), |x| format!("{:.1} %", x.mean * 100.0)),
                r.seconds
            );
        }
    };
    let outcome = tune::run(&grid, &settings, &args.out, args.dry_run, &mut report)?;
    let summary = tune::report::summary(&outcome, &settings, outcome.files.as_ref());
    println!("{summary}");
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Classify { inputs, limit, no_purify, defense } => {
            classify(inputs, *limit, *no_purify, defense)
        }
        Command::Eval { data, limit, no_purify, defense } => {
            eval(data, *limit, *no_purify, defense)
        }
        Command::Run { source, defense } => run(source, defense),
        Command::Tune(args) => tune(args),
        Command::Attack(args) => attack_cmd::attack(args),
        Command::Gradcheck(args) => gradcheck_cmd::gradcheck(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let user = e.downcast_ref::<diffshield::Error>().is_none_or(|e| e.is_user_error());
            ExitCode::from(if user { 2 } else { 1 })
        }
    }
}
