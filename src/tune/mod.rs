//! `diffshield tune`: sweep a grid of defence configurations and measure, for each point, the
//! latency of single defended frames (p50/p99 on this machine), the defended clean accuracy and
//! the robust accuracy under an attack; then report the Pareto frontier of robust accuracy
//! against p50 latency (CSV, Markdown, SVG plots) and the accuracy-against-T* depth sweep.
//!
//! Modules: [`grid`] (axes, TOML grid files, expansion into points), [`measure`] (one point:
//! latency, clean and robust accuracy; [`measure::robust_accuracy`] is the one place that runs
//! an attack), `cache` (one JSON file per point, so a sweep resumes and extends), [`pareto`],
//! `report` (CSV, Markdown, JSON summary) and `plot` (SVG via plotters); the last three are
//! crate-private: [`run`] writes their files.

pub(crate) mod cache;
pub mod grid;
pub mod measure;
pub mod pareto;
pub(crate) mod plot;
pub(crate) mod report;
#[cfg(test)]
mod tests;

use crate::attack::gradients::AttackMode;
use crate::attack::{AttackKind, ThreatModel};
use crate::config::DefenseConfig;
use crate::data::cifar::read_cifar_bin;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::schedule::DdimPlan;
use grid::{Grid, GridPoint};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// Default images of the clean pass (also the latency samples) of `diffshield tune`.
pub const DEFAULT_IMAGES: usize = 24;
/// Default untimed warm-up frames.
pub const DEFAULT_WARMUP: usize = 2;
/// Default Square Attack query budget per image.
pub const DEFAULT_QUERIES: usize = 12;
/// Default images attacked.
pub const DEFAULT_ATTACK_IMAGES: usize = 8;
/// Default fresh-noise evaluations per adversarial image.
pub const DEFAULT_RUNS: u32 = 2;
/// The attack `tune` measures robust accuracy under unless told otherwise: BPDA where this build
/// has the differentiable twin, else the gradient-free Square Attack (so that a plain
/// `--no-default-features` build still tunes robustness instead of refusing its own default).
pub const DEFAULT_ATTACK: &str = if cfg!(feature = "twin") { "bpda" } else { "square" };
/// The noise seed of every point when the base configuration sets none: tune compares points
/// on the same, reproducible noise (a deployed defence draws its seed from the OS instead).
pub const FIXED_SEED: u64 = 0;
/// Default PGD steps of the BPDA attack.
pub const DEFAULT_PGD_STEPS: usize = 5;
/// Default EOT samples per BPDA gradient.
pub const DEFAULT_EOT: u32 = 2;

/// Parses tune's `--attack`: `none` (no robust accuracy), `square` (the Square Attack on the
/// defended pipeline's outputs) or `bpda` (PGD with BPDA + EOT through the purifier).
pub fn parse_attack(s: &str) -> Result<Option<AttackKind>> {
    match s.trim().to_ascii_lowercase().as_str() {
        "none" => Ok(None),
        "square" => Ok(Some(AttackKind::Square)),
        "bpda" => Ok(Some(AttackKind::Pgd)),
        "apgd" => Ok(Some(AttackKind::Apgd)),
        _ => Err(Error::InvalidConfig(format!(
            "unknown attack {s:?}: expected square, bpda, apgd or none"
        ))),
    }
}

/// The name [`parse_attack`] reads back: `none`, `square`, `bpda` (PGD) or `apgd`.
pub fn attack_name(kind: Option<AttackKind>) -> &'static str {
    match kind {
        None => "none",
        Some(AttackKind::Square) => "square",
        Some(AttackKind::Pgd) => "bpda",
        Some(AttackKind::Apgd) => "apgd",
        Some(AttackKind::AaRand) => "aa-rand",
    }
}

/// The harness mode tune attacks in: the gradient attacks follow BPDA's gradient, Square
/// queries the defended pipeline (grey-box: it sees only outputs); all are evaluated defended.
pub(crate) fn attack_mode(kind: AttackKind) -> AttackMode {
    match kind {
        AttackKind::Square => AttackMode::GreyBox,
        AttackKind::Pgd | AttackKind::Apgd | AttackKind::AaRand => AttackMode::Bpda,
    }
}

/// Refuses an attack this build does not have, before anything is measured.
pub fn check_available(kind: Option<AttackKind>) -> Result<()> {
    match kind {
        Some(k) if k != AttackKind::Square && !cfg!(feature = "twin") => {
            Err(Error::AttackUnavailable(format!(
                "--attack {} needs the differentiable classifier twin (build with the default \
                 `twin` feature); use --attack square or --attack none",
                attack_name(kind)
            )))
        }
        _ => Ok(()),
    }
}

/// How robust accuracy is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttackSettings {
    /// Which attack: `None` measures no robust accuracy; PGD runs in the BPDA mode.
    pub kind: Option<AttackKind>,
    /// Threat model (Linf 8/255 by default).
    pub threat: ThreatModel,
    /// Query budget per image (Square).
    pub queries: usize,
    /// PGD steps (BPDA).
    pub pgd_steps: usize,
    /// Purification samples averaged per gradient (BPDA).
    pub eot: u32,
    /// Images attacked: the first `images` of the data file.
    pub images: usize,
    /// Evaluations of each adversarial image with fresh noise; robust accuracy is their mean.
    pub runs: u32,
}

impl AttackSettings {
    /// A canonical text form (part of the cache key).
    pub fn canonical(&self) -> String {
        match self.kind {
            None => "attack=none".into(),
            Some(_) if self.kind != Some(AttackKind::Square) => format!(
                "attack={};threat={};eps={};steps={};eot={};images={};runs={}",
                attack_name(self.kind),
                self.threat,
                grid::fmt_f64(self.threat.eps),
                self.pgd_steps,
                self.eot,
                self.images,
                self.runs
            ),
            Some(_) => format!(
                "attack=square;threat={};eps={};queries={};images={};runs={}",
                self.threat,
                grid::fmt_f64(self.threat.eps),
                self.queries,
                self.images,
                self.runs
            ),
        }
    }

    /// A one-line description, e.g. `square linf:8/255, 20 queries, 8 images, 2 runs`.
    pub fn describe(&self) -> String {
        match self.kind {
            None => "none".into(),
            Some(AttackKind::Pgd) => format!(
                "bpda+EOT {} PGD-{} EOT {}, {} images, {} runs",
                self.threat, self.pgd_steps, self.eot, self.images, self.runs
            ),
            Some(k @ (AttackKind::Apgd | AttackKind::AaRand)) => format!(
                "bpda+EOT {} {}-{} EOT {}, {} images, {} runs",
                self.threat, k, self.pgd_steps, self.eot, self.images, self.runs
            ),
            Some(AttackKind::Square) => format!(
                "square {}, {} queries, {} images, {} runs",
                self.threat, self.queries, self.images, self.runs
            ),
        }
    }
}

/// Which latency the frontier and the Pareto plot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LatencyClock {
    /// CPU time of the deciding thread when every point has one (one thread, Linux), else wall.
    #[default]
    Auto,
    /// Wall-clock time: what a caller waits, including time lost to other jobs on the machine.
    Wall,
    /// CPU time of the deciding thread: the frame's compute, nearly independent of other jobs.
    Cpu,
}

impl FromStr for LatencyClock {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(LatencyClock::Auto),
            "wall" => Ok(LatencyClock::Wall),
            "cpu" => Ok(LatencyClock::Cpu),
            _ => Err(Error::InvalidConfig(format!(
                "unknown latency clock {s:?}: expected auto, wall or cpu"
            ))),
        }
    }
}

impl fmt::Display for LatencyClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LatencyClock::Auto => "auto",
            LatencyClock::Wall => "wall",
            LatencyClock::Cpu => "cpu",
        })
    }
}

/// Most untimed warm-up frames per point.
pub const MAX_WARMUP: usize = 1000;

/// Everything about how a point is measured (all of it but `clock` is part of the cache key).
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureSettings {
    /// CIFAR-10 binary file the images come from.
    pub data: PathBuf,
    /// Images of the clean pass: each is one timed single-frame decision, so this is also the
    /// number of latency samples.
    pub clean_images: usize,
    /// Untimed single-frame decisions before the timed ones.
    pub warmup: usize,
    /// The attack.
    pub attack: AttackSettings,
    /// The rest of the configuration (models folder, vote rule, seed, ...); the grid sets the
    /// denoiser, T*, plan, eta, votes and threads.
    pub base: DefenseConfig,
    /// Which latency the frontier uses (reporting only; both are always measured and stored).
    pub clock: LatencyClock,
}

impl MeasureSettings {
    /// Checks the settings before anything is measured.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidConfig(format!("tune: {m}")));
        if self.clean_images == 0 {
            return bad("--images must be at least 1 (they are also the latency samples)");
        }
        if self.warmup > MAX_WARMUP {
            return bad(&format!("--warmup must be at most {MAX_WARMUP} frames"));
        }
        if self.attack.kind.is_some() {
            if self.attack.images == 0 {
                return bad("--attack-images must be at least 1 (or --attack none)");
            }
            if self.attack.queries == 0 || self.attack.runs == 0 {
                return bad("--queries and --runs must be at least 1");
            }
        }
        if self.base.budget_ms.is_some() {
            return bad("a latency budget (budget_ms) cannot be swept; remove it from --config");
        }
        check_available(self.attack.kind)?;
        self.base.validate()
    }

    /// A canonical text form: data file name, image counts, attack, and every key of the base
    /// configuration that the grid does not set (as sorted JSON, so a key added to
    /// `DefenseConfig` later becomes part of the cache key by itself). The files' contents are
    /// in the key through [`input_fingerprints`].
    pub fn canonical(&self) -> String {
        let name = self.data.file_name().map(|n| n.to_string_lossy().into_owned());
        // Sorted explicitly: serde_json keeps insertion order if any crate enables preserve_order.
        let base: std::collections::BTreeMap<String, serde_json::Value> =
            match serde_json::to_value(&self.base) {
                Ok(serde_json::Value::Object(map)) => map
                    .into_iter()
                    .filter(|(k, _)| !KEYS_NOT_IN_BASE.contains(&k.as_str()))
                    .collect(),
                _ => Default::default(),
            };
        let base = serde_json::to_string(&base).unwrap_or_default();
        format!(
            "data={};images={};warmup={};{};base={}",
            name.unwrap_or_default(),
            self.clean_images,
            self.warmup,
            self.attack.canonical(),
            base
        )
    }
}

/// Configuration keys left out of the base in a cache key: those a grid point sets, and the
/// models folder, whose files are in the key by content ([`input_fingerprints`]), so a cache
/// stays valid for the same models in another folder.
const KEYS_NOT_IN_BASE: [&str; 11] = [
    "models",
    "denoiser",
    "t_star",
    "stride",
    "steps",
    "timesteps",
    "eta",
    "votes",
    "threads",
    "min_votes",
    "budget_ms",
];

/// Latency of single defended frames (one frame per call, all its votes), milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank; with fewer than 100 frames, the slowest).
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Timed frames.
    pub frames: usize,
    /// Median CPU time of the deciding thread per frame (Linux, one thread only; `None`
    /// elsewhere). Unlike the wall-clock figures it hardly moves when other jobs share the CPU.
    #[serde(default)]
    pub cpu_p50_ms: Option<f64>,
}

impl LatencyStats {
    /// Nearest-rank percentiles of `seconds` (wall clock) and the median of `cpu_seconds`
    /// (empty: unknown).
    pub fn from_seconds(seconds: &[f64], cpu_seconds: &[f64]) -> LatencyStats {
        let ms = |v: &[f64]| crate::stats::sorted(v.iter().map(|s| s * 1e3));
        let (wall, cpu) = (ms(seconds), ms(cpu_seconds));
        LatencyStats {
            p50_ms: percentile(&wall, 50.0),
            p99_ms: percentile(&wall, 99.0),
            mean_ms: wall.iter().sum::<f64>() / wall.len().max(1) as f64,
            frames: wall.len(),
            cpu_p50_ms: (!cpu.is_empty()).then(|| percentile(&cpu, 50.0)),
        }
    }
}

/// Nearest-rank percentile (see [`crate::stats::percentile`]); NaN for no frames, which
/// [`MeasureSettings::validate`] rules out.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    crate::stats::percentile(sorted, p).unwrap_or(f64::NAN)
}

/// Robust accuracy of one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustResult {
    /// The attack, described.
    pub attack: String,
    /// Images attacked.
    pub images: usize,
    /// Fresh-noise evaluations per adversarial image.
    pub runs: u32,
    /// Defended clean accuracy on the same (unattacked) images, from the clean pass: the
    /// like-for-like reference for `mean`.
    #[serde(default)]
    pub clean_acc: Option<f64>,
    /// Mean over runs of the fraction of adversarial images classified correctly.
    pub mean: f64,
    /// Fraction correct in every run.
    pub worst: f64,
    /// Images the attack broke: wrong in every evaluation run.
    pub fooled_during_attack: usize,
}

/// Everything measured for one grid point (the content of its cache file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// Cache key: cache version, the point and the measurement settings.
    pub key: String,
    /// The point.
    pub point: GridPoint,
    /// Its short label.
    pub label: String,
    /// The DDIM timesteps the point runs (T* ... 0).
    pub timesteps: Vec<u32>,
    /// Latency of single defended frames.
    pub latency: LatencyStats,
    /// Defended clean accuracy.
    pub clean_acc: f64,
    /// Images of the clean pass.
    pub clean_images: usize,
    /// Robust accuracy; `None` with `--attack none`.
    pub robust: Option<RobustResult>,
    /// Wall time of the point's measurement, seconds (model loading included).
    pub seconds: f64,
    /// Unix time the measurement finished.
    pub finished_unix: u64,
    /// True when this run read the result from the cache (not stored in the file).
    #[serde(skip)]
    pub cached: bool,
}

impl PointResult {
    /// DDIM steps (denoiser calls per vote).
    pub fn steps(&self) -> usize {
        self.timesteps.len().saturating_sub(1)
    }

    /// The p50 latency (ms) on `clock` (`Auto` and a missing CPU time mean wall clock).
    pub fn p50_ms(&self, clock: LatencyClock) -> f64 {
        match (clock, self.latency.cpu_p50_ms) {
            (LatencyClock::Cpu, Some(cpu)) => cpu,
            _ => self.latency.p50_ms,
        }
    }

    /// The accuracy the frontier maximises: robust accuracy, or clean accuracy without attack.
    pub fn objective(&self) -> f64 {
        self.robust.as_ref().map_or(self.clean_acc, |r| r.mean)
    }
}

/// The cache key of `point` under `settings`, with `inputs` from [`input_fingerprints`].
pub fn cache_key(point: &GridPoint, settings: &MeasureSettings, inputs: &str) -> String {
    let (version, point) = (cache::CACHE_VERSION, point.canonical());
    format!("v{version}|{point}|{}|{inputs}", settings.canonical())
}

/// Per point, what its numbers depend on beyond the settings' text: the SHA-256 of the data
/// file, of the models' manifest and of each model file the point runs, the CPU
/// ([`crate::backend::cpu_name`]) and the kernel `level` the sweep runs at
/// ([`crate::backend::KernelLevel::from_env`]): another CPU or level changes the latency. Part
/// of the cache key, so that a data file rewritten in place, a retrained model, a cache folder
/// copied to another machine or another kernel level is measured again instead of being read
/// from the cache. Each file is hashed once. `manifest` must be the one in
/// `settings.base.models_dir()` (as [`run`] loads it once for this and [`check_points`]): the
/// files hashed are those it names in its own folder.
pub fn input_fingerprints(
    points: &[GridPoint],
    settings: &MeasureSettings,
    manifest: &Manifest,
    level: crate::backend::KernelLevel,
) -> Result<Vec<String>> {
    let mut digests = std::collections::HashMap::<PathBuf, String>::new();
    let mut digest = |path: &Path| -> Result<String> {
        if let Some(d) = digests.get(path) {
            return Ok(d.clone());
        }
        let d = crate::files::sha256_file(path)?;
        digests.insert(path.to_path_buf(), d.clone());
        Ok(d)
    };
    let data = digest(&settings.data)?;
    // The manifest holds the diffusion schedule and each denoiser's trained range.
    let manifest_file = digest(&manifest.file())?;
    let (cpu, kernels) = (crate::backend::cpu_name(), level.name());
    points
        .iter()
        .map(|p| {
            let mut text =
                format!("data={data};cpu={cpu};kernels={kernels};manifest={manifest_file}");
            for (role, path) in manifest.files_of(&p.config(&settings.base))? {
                text.push_str(&format!(";{role}={}", digest(&path)?));
            }
            Ok(text)
        })
        .collect()
}

/// Builds every point's DDIM plan against the manifest, so a T* outside a denoiser's trained
/// range or an unknown tier is refused before anything is measured. Returns the timesteps.
/// `manifest` must be the one in `base.models_dir()`.
pub fn check_points(
    points: &[GridPoint],
    base: &DefenseConfig,
    manifest: &Manifest,
) -> Result<Vec<Vec<u32>>> {
    let schedule = manifest.schedule()?;
    points
        .iter()
        .map(|p| {
            let entry = manifest.denoiser(&p.denoiser)?;
            let plan =
                DdimPlan::new(&schedule, entry.trained_range(), p.t_star, &p.plan.spec(), p.eta)?;
            p.config(base).validate()?;
            Ok(plan.timesteps().to_vec())
        })
        .collect()
}

/// What happens as a sweep goes, for a progress display.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// Point `index` of `total` starts being measured.
    Measuring {
        /// Which point of the grid (0-based).
        index: usize,
        /// Points in the grid.
        total: usize,
        /// The point.
        point: &'a GridPoint,
    },
    /// Point `index` of `total` was found in the cache.
    Cached {
        /// Which point of the grid (0-based).
        index: usize,
        /// Points in the grid.
        total: usize,
        /// The point.
        point: &'a GridPoint,
    },
    /// Point `index` finished.
    Done {
        /// Which point of the grid (0-based).
        index: usize,
        /// Points in the grid.
        total: usize,
        /// What was measured.
        result: &'a PointResult,
    },
}

/// Files a sweep writes besides the per-point cache.
#[derive(Debug, Clone, Serialize)]
pub struct OutputFiles {
    /// One row per point.
    pub csv: PathBuf,
    /// Frontier table.
    pub markdown: PathBuf,
    /// Robust accuracy against p50 latency, frontier marked.
    pub pareto_svg: PathBuf,
    /// Clean and robust accuracy against T*.
    pub depth_svg: PathBuf,
    /// The JSON summary (also printed).
    pub summary: PathBuf,
}

/// The outcome of a sweep.
#[derive(Debug, Clone)]
pub struct TuneOutcome {
    /// One result per grid point, in grid order.
    pub results: Vec<PointResult>,
    /// The latency the frontier uses: `Wall` or `Cpu` (never `Auto`).
    pub clock: LatencyClock,
    /// Whether each result is on the Pareto frontier.
    pub on_frontier: Vec<bool>,
    /// Frontier indices sorted by latency.
    pub frontier: Vec<usize>,
    /// Points measured by this run.
    pub measured: usize,
    /// Points read from the cache.
    pub cached: usize,
    /// Labels of the points not measured (only a dry run leaves any).
    pub pending: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
    /// Files written (`None` on a dry run).
    pub files: Option<OutputFiles>,
}

/// The names a sweep writes in its output folder (the cache is a folder of its own).
pub const OUTPUT_NAMES: [&str; 6] =
    ["tune.csv", "pareto.md", "pareto.svg", "depth.svg", "summary.json", cache::CACHE_DIR];

/// Refuses `inputs` that a sweep into `out` would replace: a file at one of
/// [`OUTPUT_NAMES`] in `out`, or inside its cache folder. [`run`] checks the data file and the
/// models' manifest; a caller with more inputs (a grid or config file) checks those too.
pub fn check_inputs_kept(out: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(out) else {
        // No folder yet, so nothing inside it.
        return Ok(());
    };
    for input in inputs {
        let Ok(full) = std::fs::canonicalize(input) else { continue };
        let clash = OUTPUT_NAMES.iter().any(|name| full == out.join(name))
            || full.starts_with(out.join(cache::CACHE_DIR));
        if clash {
            return Err(Error::InvalidConfig(format!(
                "tune --out {}: would replace the input {}; move it or write elsewhere",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// The output folder is checked before anything is measured, after everything else: a folder
/// (made if missing) that takes a new file, is not the data file and replaces no input.
fn check_out_folder(out: &Path, data: &Path, manifest: &Path) -> Result<()> {
    let bad =
        |reason: String| Error::InvalidConfig(format!("tune --out {}: {reason}", out.display()));
    if out.exists() && !out.is_dir() {
        return Err(bad("exists and is not a folder".into()));
    }
    let same = std::fs::canonicalize(out).ok() == std::fs::canonicalize(data).ok();
    if same {
        return Err(bad("is the data file".into()));
    }
    check_inputs_kept(out, &[data, manifest])?;
    crate::files::create_dir(out)?;
    let probe = out.join(format!(".probe-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| bad(format!("cannot be written ({e})")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

impl TuneOutcome {
    /// The JSON summary the sweep writes (`summary.json`) and `diffshield tune` prints: the
    /// settings, every point, the frontier and the files.
    pub fn summary(&self, settings: &MeasureSettings) -> serde_json::Value {
        report::summary(self, settings, self.files.as_ref())
    }
}

/// Runs a sweep: every point of `grid` not in the cache under `out` is measured and cached, then
/// the CSV, Markdown table, plots and summary are written under `out`. With `dry_run` nothing is
/// measured or written: the results hold only the cached points.
pub fn run(
    grid: &Grid,
    settings: &MeasureSettings,
    out: &Path,
    dry_run: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<TuneOutcome> {
    let started = Instant::now();
    let mut settings = settings.clone();
    settings.base.seed.get_or_insert(FIXED_SEED);
    let settings = &settings;
    settings.validate()?;
    let points = grid.points()?;
    if points.is_empty() {
        return Err(Error::InvalidConfig("tune: the grid has no points".into()));
    }
    let manifest = Manifest::load(&settings.base.models_dir()?)?;
    check_points(&points, &settings.base, &manifest)?;
    if !dry_run {
        // The data must open before the output folder is made: a failed start leaves nothing.
        crate::data::cifar::open_records(&settings.data)?;
        check_out_folder(out, &settings.data, &manifest.file())?;
    }
    let level = crate::backend::KernelLevel::from_env().map_err(Error::InvalidConfig)?;
    let inputs = input_fingerprints(&points, settings, &manifest, level)?;
    let keys: Vec<String> =
        points.iter().zip(&inputs).map(|(p, inputs)| cache_key(p, settings, inputs)).collect();
    let total = points.len();
    let mut results = Vec::with_capacity(total);
    let mut missing = Vec::new();
    for (i, (p, key)) in points.iter().zip(&keys).enumerate() {
        match cache::load(out, key) {
            Some(mut r) => {
                r.cached = true;
                progress(Progress::Cached { index: i, total, point: p });
                results.push(Some(r));
            }
            None => {
                missing.push(i);
                results.push(None);
            }
        }
    }
    let mut measured = 0;
    if !dry_run && !missing.is_empty() {
        let need = settings.clean_images.max(match settings.attack.kind {
            None => 0,
            Some(_) => settings.attack.images,
        });
        let set = read_cifar_bin(&settings.data, Some(need))?;
        for &i in &missing {
            progress(Progress::Measuring { index: i, total, point: &points[i] });
            let r = measure::measure_point(&points[i], &keys[i], settings, &set)?;
            cache::store(out, &r)?;
            progress(Progress::Done { index: i, total, result: &r });
            results[i] = Some(r);
            measured += 1;
        }
    }
    let results: Vec<PointResult> = results.into_iter().flatten().collect();
    let all_cpu = results.iter().all(|r| r.latency.cpu_p50_ms.is_some());
    let clock = match settings.clock {
        LatencyClock::Auto | LatencyClock::Cpu if all_cpu => LatencyClock::Cpu,
        LatencyClock::Cpu => {
            log::warn!(
                "not every point has a CPU time (threads > 1?): the frontier uses wall time"
            );
            LatencyClock::Wall
        }
        _ => LatencyClock::Wall,
    };
    let pairs: Vec<(f64, f64)> = results.iter().map(|r| (r.p50_ms(clock), r.objective())).collect();
    let on_frontier = pareto::frontier(&pairs);
    let frontier = pareto::frontier_order(&pairs);
    let cached = results.iter().filter(|r| r.cached).count();
    let mut outcome = TuneOutcome {
        clock,
        results,
        on_frontier,
        frontier,
        measured,
        cached,
        pending: Vec::new(),
        seconds: started.elapsed().as_secs_f64(),
        files: None,
    };
    if dry_run {
        outcome.pending = missing.iter().map(|&i| points[i].label()).collect();
    } else {
        outcome.files = Some(report::write_all(&outcome, settings, out)?);
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}
