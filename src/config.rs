//! The defence configuration: every knob of the purifier and pipeline, from a TOML file
//! (`--config FILE`, same keys as the CLI options) and/or the command line, validated once.

use crate::error::{Error, Result};
use crate::schedule::PlanSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the votes of one frame are combined into its decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VoteRule {
    /// The label most votes chose; ties go to the tied label with the highest mean probability.
    #[default]
    Majority,
    /// The argmax of the mean of the votes' softmax probabilities.
    MeanProb,
}

/// Which engine runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// tract on the CPU with this crate's kernels (f32 or int8).
    #[default]
    Cpu,
    /// tract-cuda on an NVIDIA GPU (feature `cuda`; f32): an error where none is usable.
    Cuda,
    /// CUDA where it is usable, else the CPU (the choice is logged).
    Auto,
}

/// Numeric precision of the models: which file of each manifest entry is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// The float32 models (`file`).
    #[default]
    F32,
    /// The statically quantized int8 models (`int8_file`, QOperator form; see docs/int8.md).
    Int8,
}

/// Every setting of the defended pipeline. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefenseConfig {
    /// Diffusion depth T* the input is noised to (must lie in the denoiser's trained range).
    pub t_star: u32,
    /// DDIM stride (tau = T*, T*-stride, ..., 0). Used when neither `steps` nor `timesteps` is set.
    pub stride: Option<u32>,
    /// Number of DDIM steps from T* to 0 (instead of a stride).
    pub steps: Option<u32>,
    /// Explicit strictly decreasing timestep list starting at T* (instead of a stride).
    pub timesteps: Option<Vec<u32>>,
    /// Fresh-noise scale of every DDIM step: 1 = the paper's stochastic sampler, 0 = deterministic.
    pub eta: f64,
    /// Purifications per frame; their classifications are combined by `vote_rule`. The default,
    /// 3, was measured (README, "Votes"): on the first 500 CIFAR-10 test images it lifts
    /// defended accuracy from 67.4 % (1 vote) to 74.2 % for 3.4x the CPU time; 5 votes add 0.6
    /// points for another 2.3x. A budget plans between `min_votes` and this.
    pub votes: u32,
    /// How votes are combined.
    pub vote_rule: VoteRule,
    /// Seed of the noise streams: (seed, frame index) reproduces a decision exactly. `None`
    /// (the default) draws a fresh seed from the operating system's entropy source for every
    /// [`crate::Defense`] or pipeline built, so an attacker cannot predict the defence's noise;
    /// each decision reports the seed it used. Fix it only to replay, test or attack.
    pub seed: Option<u64>,
    /// Denoiser tier from the manifest ("s": 1.6 M params, edge; "m": 6.5 M params).
    pub denoiser: String,
    /// CPU threads the models run on: one pool per pipeline, made once; each conv, attention
    /// and GroupNorm op splits its work over it (results are the same bits for any count).
    /// Default: [`default_threads`], one per core this process may run on.
    pub threads: usize,
    /// Inference engine.
    pub backend: BackendKind,
    /// Model precision: `f32` or `int8` (the manifest's `int8_file` of each model).
    pub precision: Precision,
    /// Frames purified together in one batch (each with `votes` purifications).
    pub batch: usize,
    /// Folder holding models.toml and the ONNX files; `None`: the `DIFFSHIELD_MODELS`
    /// environment variable, else the models folder this build was made from (see
    /// [`DefenseConfig::models_dir`]). A relative path in a config file is relative to the file.
    pub models: Option<PathBuf>,
    /// Per-frame latency budget in milliseconds; `None` runs the full plan with `votes` votes.
    /// Under a budget the planner picks the steps (at the same T*) and votes per frame, within
    /// `min_steps..=plan steps` and `min_votes..=votes`.
    pub budget_ms: Option<f64>,
    /// Fewest DDIM steps the budget planner may choose.
    pub min_steps: usize,
    /// Fewest votes the budget planner may choose.
    pub min_votes: u32,
    /// Classes listed in each decision's `top_k`, best first (1..=the number of classes).
    pub top_k: usize,
    /// Abstain (label `None`, class "unknown") when the chosen label's mean probability over
    /// the votes is below this, in \[0, 1\]; `None` never abstains.
    pub min_confidence: Option<f32>,
}

impl Default for DefenseConfig {
    fn default() -> Self {
        Self {
            t_star: 140,
            stride: None,
            steps: None,
            timesteps: None,
            eta: 1.0,
            votes: DEFAULT_VOTES,
            vote_rule: VoteRule::Majority,
            seed: None,
            denoiser: "s".into(),
            threads: default_threads(),
            backend: BackendKind::Cpu,
            precision: Precision::F32,
            batch: 1,
            models: None,
            budget_ms: None,
            min_steps: 1,
            min_votes: 1,
            top_k: 3,
            min_confidence: None,
        }
    }
}

/// One thread per CPU core this process may run on: the default of
/// [`DefenseConfig::threads`].
///
/// The smaller of the CPUs the OS lets the process use (its affinity mask and cgroup CPU quota,
/// as [`std::thread::available_parallelism`] counts them) and the machine's physical cores: a
/// core's second hardware thread shares the multiply-add units our kernels already keep busy
/// from one thread, so it is not counted. At least 1.
pub fn default_threads() -> usize {
    // The topology is read once (num_cpus parses /proc/cpuinfo on Linux); the affinity mask
    // each time, since it may change while the process runs.
    static PHYSICAL_CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let physical = *PHYSICAL_CORES.get_or_init(num_cpus::get_physical);
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    usable.min(physical).max(1)
}

/// The environment variable naming the models folder when no `models` is configured.
pub const MODELS_ENV: &str = "DIFFSHIELD_MODELS";

/// The `models/` folder of the source tree the library was compiled from.
const BUILT_MODELS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models");

/// Most votes per frame.
pub const MAX_VOTES: u32 = 256;
/// Most frames per batch.
pub const MAX_BATCH: usize = 1024;
/// Most purifications in one pipeline call (batch x votes); bounds the memory of a call.
pub const MAX_BATCH_IMAGES: usize = 4096;

/// Votes per frame when a configuration names none (see [`DefenseConfig::votes`]).
pub const DEFAULT_VOTES: u32 = 3;

/// Stride used when a configuration names neither stride, steps nor timesteps.
pub const DEFAULT_STRIDE: u32 = 10;

impl DefenseConfig {
    /// Reads a TOML file; unknown keys are refused so a typo never passes silently. A relative
    /// `models` path is taken relative to the file's folder, so a config works from any
    /// working directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::ConfigFile { path: path.into(), reason };
        let text = crate::files::read_input_to_string(path).map_err(|e| match e {
            Error::Io { source, .. } => bad(source.to_string()),
            other => other,
        })?;
        let mut config: Self =
            toml::from_str(&text).map_err(|e| bad(crate::files::toml_error(&text, &e)))?;
        if let Some(m) = config.models.as_mut().filter(|m| m.is_relative()) {
            *m = path.parent().unwrap_or(Path::new("")).join(&*m);
        }
        Ok(config)
    }

    /// The models folder: `models` if set; else the `DIFFSHIELD_MODELS` environment variable;
    /// else the `models/` folder of the source tree this library was built from, when it
    /// still holds a `models.toml`. An error names all three ways of giving one.
    pub fn models_dir(&self) -> Result<PathBuf> {
        if let Some(m) = &self.models {
            return Ok(m.clone());
        }
        if let Some(m) = std::env::var_os(MODELS_ENV).filter(|m| !m.is_empty()) {
            return Ok(PathBuf::from(m));
        }
        let built = Path::new(BUILT_MODELS_DIR);
        if crate::manifest::Manifest::path_in(built).is_file() {
            return Ok(built.to_path_buf());
        }
        Err(Error::InvalidConfig(format!(
            "no models folder: give one with --models DIR (config key `models`) or the \
             {MODELS_ENV} environment variable; the folder this build came from, {}, has no \
             models.toml",
            built.display()
        )))
    }

    /// The noise seed to use: `seed` if set, else a fresh one from the OS entropy source.
    pub fn resolve_seed(&self) -> Result<u64> {
        match self.seed {
            Some(s) => Ok(s),
            None => crate::noise::os_seed(),
        }
    }

    /// The DDIM sub-sequence the configuration asks for (at most one of stride/steps/timesteps).
    pub fn plan_spec(&self) -> Result<PlanSpec> {
        match (self.stride, self.steps, &self.timesteps) {
            (None, None, None) => Ok(PlanSpec::Stride(DEFAULT_STRIDE)),
            (Some(s), None, None) => Ok(PlanSpec::Stride(s)),
            (None, Some(n), None) => Ok(PlanSpec::Steps(n)),
            (None, None, Some(list)) => Ok(PlanSpec::Timesteps(list.clone())),
            _ => Err(Error::InvalidConfig("give only one of stride, steps and timesteps".into())),
        }
    }

    /// Checks the settings that do not need the models (T* range is checked by the plan).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.votes == 0 {
            return bad("votes must be at least 1".into());
        }
        if self.votes > MAX_VOTES {
            return bad(format!("votes must be at most {MAX_VOTES}, got {}", self.votes));
        }
        if self.batch > MAX_BATCH {
            return bad(format!("batch must be in 1..={MAX_BATCH}, got {}", self.batch));
        }
        let images = self.batch as u64 * u64::from(self.votes);
        if images > MAX_BATCH_IMAGES as u64 {
            return bad(format!(
                "batch x votes = {images} purifications at once is more than the \
                 {MAX_BATCH_IMAGES} allowed (each holds a few states of the image)"
            ));
        }
        if self.threads == 0 {
            return bad("threads must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("batch must be at least 1".into());
        }
        if !self.eta.is_finite() || !(0.0..=1.0).contains(&self.eta) {
            return bad(format!("eta must be in [0, 1], got {}", self.eta));
        }
        if let Some(ms) = self.budget_ms {
            if !ms.is_finite() || ms <= 0.0 {
                return bad(format!(
                    "budget_ms must be a positive number of milliseconds, got {ms}"
                ));
            }
        }
        if self.min_steps == 0 {
            return bad("min_steps must be at least 1".into());
        }
        if self.top_k == 0 {
            return bad("top_k must be at least 1".into());
        }
        if let Some(c) = self.min_confidence {
            if !(c.is_finite() && (0.0..=1.0).contains(&c)) {
                return bad(format!("min_confidence must be in [0, 1], got {c}"));
            }
        }
        if self.min_votes == 0 || self.min_votes > self.votes {
            return bad(format!(
                "min_votes must be in 1..=votes ({}), got {}",
                self.votes, self.min_votes
            ));
        }
        self.plan_spec().map(|_| ())
    }

    /// The latency budget and the planner's limits for a plan of `plan_steps` steps, if a
    /// budget is set.
    pub fn budget(&self, plan_steps: usize) -> Option<crate::budget::Budget> {
        self.budget_ms.map(|ms| crate::budget::Budget {
            seconds: ms / 1e3,
            limits: crate::budget::BudgetLimits {
                min_steps: self.min_steps.min(plan_steps),
                max_steps: plan_steps,
                min_votes: self.min_votes,
                max_votes: self.votes,
            },
        })
    }
}
