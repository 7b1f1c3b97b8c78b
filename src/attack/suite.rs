//! The suite runner behind `diffshield attack`: every (threat model, mode) cell over every batch
//! of images, the report saved atomically after each finished batch so that a killed run keeps
//! what it measured, `--resume` continuing it, and the Markdown and JUnit outputs at the end.

use super::eval::{correct_runs, Evaluated, RunAccuracy};
use super::gradients::AttackMode;
use super::harness::{run_cell, HarnessConfig, Twins};
use super::report::{AttackReport, COUNTING};
use super::{parse_fraction, AttackKind, ThreatModel};
use crate::config::DefenseConfig;
use crate::data::cifar::read_cifar_bin;
use crate::error::{Error, Result};
use crate::files::write_atomically;
use crate::manifest::Manifest;
use crate::pipeline::Pipeline;
use ndarray::s;
use std::path::PathBuf;
use std::time::Instant;

/// The defence's noise seed in attack runs when the configuration fixes none: an evaluation
/// must be reproducible (a deployed defence draws its seed from the OS instead).
pub const FIXED_SEED: u64 = 0;

/// What to attack and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    /// CIFAR-10 binary file of the attacked images.
    pub data: PathBuf,
    /// Attack the first `limit` images.
    pub limit: usize,
    /// Threat models, in report order.
    pub threats: Vec<ThreatModel>,
    /// Modes, in report order.
    pub modes: Vec<AttackMode>,
    /// The attack and its settings.
    pub harness: HarnessConfig,
    /// Images attacked together (one saved batch).
    pub batch: usize,
}

/// Where the suite writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteOutputs {
    /// The JSON report, rewritten after every finished batch.
    pub report: Option<PathBuf>,
    /// Continue the run saved in `report` (same settings) instead of starting over.
    pub resume: bool,
    /// The Markdown table (the paper's Table 2 layout).
    pub markdown: Option<PathBuf>,
    /// JUnit XML: one test case per (threat, mode), failing below its threshold.
    pub junit: Option<PathBuf>,
    /// The JUnit thresholds.
    pub min_acc: Thresholds,
}

/// JUnit thresholds: a fraction for every cell and/or per mode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds {
    /// Threshold of every mode without its own.
    pub all: Option<f64>,
    /// Per-mode thresholds.
    pub per_mode: Vec<(AttackMode, f64)>,
}

impl Thresholds {
    /// Parses `--min-acc` entries: `0.3` (every cell) and/or `MODE=FRACTION`
    /// (`white-box=0.25`, `bpda=1/4`).
    pub fn parse(entries: &[String]) -> Result<Self> {
        let mut t = Thresholds::default();
        for e in entries {
            let value = |v: &str| -> Result<f64> {
                let x = parse_fraction(v)?;
                if !(0.0..=1.0).contains(&x) {
                    return Err(Error::InvalidConfig(format!(
                        "--min-acc {e:?}: a threshold is a fraction in [0,1]"
                    )));
                }
                Ok(x)
            };
            match e.split_once('=') {
                Some((m, v)) => t.per_mode.push((m.parse::<AttackMode>()?, value(v)?)),
                None => t.all = Some(value(e)?),
            }
        }
        Ok(t)
    }

    /// The threshold of `mode`: its own entry, else the one for every cell.
    pub fn of(&self, mode: AttackMode) -> Option<f64> {
        self.per_mode.iter().find(|(m, _)| *m == mode).map(|&(_, v)| v).or(self.all)
    }
}

/// Progress of a suite, for a display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuiteProgress<'a> {
    /// Batches done (finished now or earlier) of `total`.
    pub done: usize,
    /// Batches in the whole run.
    pub total: usize,
    /// The cell being worked on, e.g. `white-box linf:8/255`.
    pub mode: AttackMode,
    /// Its threat model.
    pub threat: &'a ThreatModel,
}

/// A finished suite.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteOutcome {
    /// The whole report (also written to `SuiteOutputs::report`).
    pub report: AttackReport,
    /// The field's sanity checks that failed, as warnings.
    pub warnings: Vec<String>,
    /// The report as the paper's Table 2 (Markdown).
    pub markdown: String,
    /// The cells below their `--min-acc` threshold (empty when all passed or none was set).
    pub below: Vec<String>,
}

/// Runs `suite` against the defence `config` describes (its seed fixed to [`FIXED_SEED`] when
/// unset), writing `outputs`; `progress` is called before each batch.
pub fn run_suite(
    config: &DefenseConfig,
    suite: &Suite,
    outputs: &SuiteOutputs,
    progress: &mut dyn FnMut(SuiteProgress),
) -> Result<SuiteOutcome> {
    let mut config = config.clone();
    config.seed.get_or_insert(FIXED_SEED);
    config.validate()?;
    suite.harness.validate()?;
    if suite.modes.is_empty() || suite.threats.is_empty() {
        return Err(Error::InvalidConfig("an attack needs at least one mode and threat".into()));
    }
    if suite.limit == 0 {
        return Err(Error::InvalidConfig("--limit 0 attacks no image".into()));
    }
    let per_call = suite.batch as u64 * u64::from(suite.harness.eot.max(1));
    if suite.batch == 0 || per_call > crate::config::MAX_BATCH_IMAGES as u64 {
        return Err(Error::InvalidConfig(format!(
            "--attack-batch {} x --eot {} purifications per gradient must be in 1..={}",
            suite.batch,
            suite.harness.eot,
            crate::config::MAX_BATCH_IMAGES
        )));
    }
    if outputs.resume && outputs.report.is_none() {
        return Err(Error::InvalidConfig("--resume needs the report file (--out)".into()));
    }
    let manifest = Manifest::load(&config.models_dir()?)?;
    let model_files = model_files(&manifest, &config)?;
    // Every output is checked (and the report locked) before the first image is attacked.
    let named: Vec<(&str, &std::path::Path)> = [
        ("--out", outputs.report.as_deref()),
        ("--markdown", outputs.markdown.as_deref()),
        ("--junit", outputs.junit.as_deref()),
    ]
    .into_iter()
    .filter_map(|(role, p)| p.map(|p| (role, p)))
    .collect();
    let mut inputs: Vec<&std::path::Path> = vec![suite.data.as_path()];
    inputs.extend(model_files.iter().map(|(_, p)| p.as_path()));
    crate::files::check_outputs(&named, &inputs)?;
    let _lock = outputs.report.as_deref().map(crate::files::OutputLock::acquire).transpose()?;
    if let (Some(path), true) = (&outputs.report, outputs.resume) {
        if !path.is_file() {
            return Err(Error::InvalidConfig(format!(
                "--resume: {} does not exist; run without --resume to start it",
                path.display()
            )));
        }
    }
    let mut fingerprints = std::collections::BTreeMap::new();
    fingerprints.insert("data".to_string(), file_fingerprint(&suite.data)?);
    for (role, path) in &model_files {
        fingerprints.insert(role.clone(), file_fingerprint(path)?);
    }
    let mut pipeline = Pipeline::from_config(&config)?;
    let set = read_cifar_bin(&suite.data, Some(suite.limit))?;
    let n = set.labels.len();
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let (mut classifier, mut denoiser) = (None, None);
    if suite.harness.attack != AttackKind::Square {
        classifier = crate::grad::load_classifier_twin(&manifest)?;
        if suite.modes.contains(&AttackMode::WhiteBox) {
            denoiser = crate::grad::load_denoiser_twin(&manifest, &config.denoiser)?;
        }
    }
    let mut twins = Twins {
        classifier: classifier.as_deref_mut().map(|c| c as _),
        denoiser: denoiser.as_deref_mut().map(|d| d as _),
    };

    let started = Instant::now();
    let runs = suite.harness.runs;
    let fresh = {
        let clean = correct_runs(
            &mut pipeline,
            Evaluated::Defended,
            set.images.view(),
            &labels,
            runs,
            0,
            0,
        )?;
        let clean = RunAccuracy::from_counts(&clean, runs);
        let bare = correct_runs(
            &mut pipeline,
            Evaluated::Undefended,
            set.images.view(),
            &labels,
            1,
            0,
            0,
        )?;
        AttackReport {
            data: suite.data.display().to_string(),
            images: n,
            config: config.clone(),
            harness: suite.harness.clone(),
            threats: suite.threats.iter().map(|t| t.to_string()).collect(),
            modes: suite.modes.clone(),
            counting: COUNTING.into(),
            clean_acc: clean.mean,
            clean_acc_worst: clean.worst,
            clean_acc_majority: clean.majority,
            undefended_clean_acc: RunAccuracy::from_counts(&bare, 1).mean,
            results: Vec::new(),
            summary: Vec::new(),
            complete: false,
            seconds: 0.0,
            fingerprints,
        }
    };
    let mut report = match (&outputs.report, outputs.resume) {
        (Some(path), true) => {
            let saved = AttackReport::read(path)?;
            saved.resumable_with(&fresh)?;
            // Keep the finished cells; the clean figures are those of the images now requested
            // (a larger limit extends the run).
            AttackReport { results: saved.results, seconds: saved.seconds, ..fresh }
        }
        _ => fresh,
    };
    let seconds_before = report.seconds;
    let save = |report: &AttackReport| -> Result<()> {
        match &outputs.report {
            Some(path) => write_atomically(path, report.to_json()?.as_bytes()),
            None => Ok(()),
        }
    };

    let batches: Vec<(usize, usize)> =
        (0..n).step_by(suite.batch).map(|a| (a, (a + suite.batch).min(n))).collect();
    let total = suite.threats.len() * suite.modes.len() * batches.len();
    let mut done = 0;
    for (ti, threat) in suite.threats.iter().enumerate() {
        for (mi, &mode) in suite.modes.iter().enumerate() {
            let name = threat.to_string();
            let cell = u32::try_from(ti * AttackMode::ALL.len() + mi + 1)
                .map_err(|_| Error::InvalidConfig("too many threat models".into()))?;
            for &(a, b) in &batches {
                progress(SuiteProgress { done, total, mode, threat });
                done += 1;
                if (a..b).all(|i| report.cell_mut(&name, mode).has(i)) {
                    continue;
                }
                let t0 = Instant::now();
                let x = set.images.slice(s![a..b, .., .., ..]);
                let outcomes = run_cell(
                    &mut pipeline,
                    &mut twins,
                    &suite.harness,
                    *threat,
                    mode,
                    x,
                    &labels[a..b],
                    a,
                    cell,
                )?;
                report.cell_mut(&name, mode).add(outcomes, runs, t0.elapsed().as_secs_f64());
                report.seconds = seconds_before + started.elapsed().as_secs_f64();
                report.summarise(runs);
                save(&report)?;
            }
        }
    }
    report.seconds = seconds_before + started.elapsed().as_secs_f64();
    report.summarise(runs);
    save(&report)?;
    let markdown = report.markdown();
    if let Some(path) = &outputs.markdown {
        write_atomically(path, markdown.as_bytes())?;
    }
    let lookup = |m: AttackMode, _: &str| outputs.min_acc.of(m);
    let below = report
        .results
        .iter()
        .filter_map(|c| {
            let min = lookup(c.mode, &c.threat)?;
            (c.robust_acc < min)
                .then(|| format!("{} {}: {:.4} < {min:.4}", c.mode, c.threat, c.robust_acc))
        })
        .collect();
    if let Some(path) = &outputs.junit {
        write_atomically(path, report.junit(&lookup).as_bytes())?;
    }
    Ok(SuiteOutcome { warnings: report.sanity_checks(), report, markdown, below })
}

/// The model files a run uses, by role (`classifier`, `denoiser`), at its precision.
fn model_files(manifest: &Manifest, config: &DefenseConfig) -> Result<Vec<(String, PathBuf)>> {
    let c = &manifest.classifier;
    let d = manifest.denoiser(&config.denoiser)?;
    let what = format!("denoiser {}", config.denoiser);
    let precision = config.precision;
    Ok(vec![
        (
            "classifier".into(),
            manifest.file_at("classifier", &c.file, c.int8_file.as_deref(), precision)?,
        ),
        ("denoiser".into(), manifest.file_at(&what, &d.file, d.int8_file.as_deref(), precision)?),
    ])
}

/// FNV-1a 64 of a whole file, as 16 hex digits.
fn file_fingerprint(path: &std::path::Path) -> Result<String> {
    let bytes =
        std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    Ok(format!("{:016x}", crate::fingerprint::fnv1a64(&bytes)))
}
