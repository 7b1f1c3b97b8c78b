//! `diffshield tune`: the grid sweep's options; the sweep, its cache and its outputs are the
//! library's (`diffshield::tune`).

use anyhow::Context;
use clap::Args;
use diffshield::DefenseConfig;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `diffshield tune`.
#[derive(Args, Clone)]
pub struct TuneArgs {
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
    /// CPU thread counts, e.g. 1,2 [default: 1, so that points rank by CPU time].
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

pub fn tune(args: &TuneArgs) -> anyhow::Result<()> {
    use diffshield::tune::{self, grid::Grid, grid::GridAxes, Progress};
    if args.print_grid {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", tune::grid::DEFAULT_GRID_TOML.trim_start())
            .and_then(|()| stdout.flush())
            .map_err(|source| diffshield::Error::Io { path: "stdout".into(), source })?;
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
    if args.seed.is_some() {
        base.seed = args.seed;
    }
    if args.models.is_some() {
        base.models = args.models.clone();
    }
    let data = args.data.clone().context("--data is required")?;
    let settings = tune::MeasureSettings {
        data,
        clean_images: args.images,
        warmup: args.warmup,
        attack: tune::AttackSettings {
            kind: tune::parse_attack(&args.attack)?,
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
    let inputs: Vec<&std::path::Path> =
        args.grid.iter().chain(&args.config).map(std::path::PathBuf::as_path).collect();
    tune::check_inputs_kept(&args.out, &inputs)?;
    let outcome = tune::run(&grid, &settings, &args.out, args.dry_run, &mut report)?;
    let summary = outcome.summary(&settings);
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{summary}")
        .and_then(|()| stdout.flush())
        .map_err(|source| diffshield::Error::Io { path: "stdout".into(), source })?;
    Ok(())
}
