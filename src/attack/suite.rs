//! The suite runner behind `diffshield attack`: every (threat model, mode) cell over every batch
//! of images, the report saved atomically after each finished batch so that a killed run keeps
//! what it measured, `--resume` continuing it, and the Markdown and JUnit outputs at the end.

use super::eval::{evaluate_runs, EvalNoise, Evaluated, RunAccuracy, Tally};
use super::gradients::AttackMode;
use super::harness::{run_cell, AttackSpec, CellOutcome, HarnessConfig, Twins};
use super::protocol::Protocol;
use super::report::{AttackReport, ToolInfo, COUNTING};
use super::{parse_fraction, Norm, ThreatModel};
use crate::config::DefenseConfig;
use crate::data::cifar::read_cifar_bin;
use crate::error::{Error, Result};
use crate::files::write_atomically;
use crate::grad::Loss;
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
    /// The preset the settings came from (recorded in the report).
    pub protocol: Option<Protocol>,
    /// Also run the unbounded-eps probe: Linf eps 1, BPDA PGD-20 (undefended PGD-20 when no
    /// mode is defended), on the first [`PROBE_IMAGES`] images, for the sanity check that an
    /// unbounded attack reaches 0 %.
    pub unbounded_probe: bool,
    /// Where the twins compute the gradients (the evaluation always runs on the deployed
    /// backend).
    pub grad_device: crate::grad::GradDevice,
}

/// Images the unbounded-eps probe attacks.
pub const PROBE_IMAGES: usize = 8;
/// The probe's cell number (keys its noise domains apart from every real cell).
const PROBE_CELL: u32 = 1 << 20;
/// Cell numbers reserved per threat model (one per mode, with room to add modes).
const CELLS_PER_THREAT: usize = 8;

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
    /// Files the run reads besides the data and the models (a config file): like those, no
    /// output may replace them.
    pub inputs: Vec<PathBuf>,
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
    // The report's configuration and fingerprints are those of the models that run.
    crate::backend::resolve_precision(&mut config);
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
    let model_files = manifest.files_of(&config)?;
    // Every output is checked (and the report locked) before the first image is attacked.
    let named: Vec<(&str, &std::path::Path)> = [
        ("--out", outputs.report.as_deref()),
        ("--markdown", outputs.markdown.as_deref()),
        ("--junit", outputs.junit.as_deref()),
    ]
    .into_iter()
    .filter_map(|(role, p)| p.map(|p| (role, p)))
    .collect();
    let manifest_file = manifest.file();
    let mut inputs: Vec<&std::path::Path> = vec![suite.data.as_path(), manifest_file.as_path()];
    inputs.extend(model_files.iter().map(|(_, p)| p.as_path()));
    inputs.extend(outputs.inputs.iter().map(PathBuf::as_path));
    crate::files::check_outputs(&named, &inputs)?;
    let _lock = outputs.report.as_deref().map(crate::files::OutputLock::acquire).transpose()?;
    if let (Some(path), true) = (&outputs.report, outputs.resume) {
        if !path.exists() {
            return Err(Error::InvalidConfig(format!(
                "--resume: {} does not exist; run without --resume to start it",
                path.display()
            )));
        }
        crate::files::check_regular_file(path)?;
    }
    let mut fingerprints = std::collections::BTreeMap::new();
    fingerprints.insert("data".to_string(), crate::files::sha256_file(&suite.data)?);
    for (role, path) in &model_files {
        fingerprints.insert(role.clone(), crate::files::sha256_file(path)?);
    }
    let mut pipeline = Pipeline::from_config(&config)?;
    let set = read_cifar_bin(&suite.data, Some(suite.limit))?;
    let n = set.labels.len();
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let (mut classifier, mut bare_classifier, mut denoiser) = (None, None, None);
    if suite.harness.uses_gradient() || suite.unbounded_probe {
        use crate::manifest::ClassifierRole;
        let device = suite.grad_device;
        classifier =
            crate::grad::load_classifier_twin(&manifest, ClassifierRole::Defended, device)?;
        if manifest.has_defended_classifier() && suite.modes.contains(&AttackMode::Undefended) {
            bare_classifier =
                crate::grad::load_classifier_twin(&manifest, ClassifierRole::Bare, device)?;
        }
        if suite.modes.iter().any(|m| m.needs_denoiser_twin()) && suite.harness.uses_gradient() {
            denoiser =
                crate::grad::load_denoiser_twin(&manifest, &config.denoiser, suite.grad_device)?;
        }
    }
    let mut twins = Twins {
        classifier: classifier.as_deref_mut().map(|c| c as _),
        bare_classifier: bare_classifier.as_deref_mut().map(|c| c as _),
        denoiser: denoiser.as_deref_mut().map(|d| d as _),
    };

    let started = Instant::now();
    let runs = suite.harness.runs;
    let clean_noise = EvalNoise::Fresh { cell: 0 };
    let defended_clean = evaluate_runs(
        &mut pipeline,
        Evaluated::Defended,
        set.images.view(),
        &labels,
        runs,
        clean_noise,
        0,
    )?;
    let bare_clean = evaluate_runs(
        &mut pipeline,
        Evaluated::Undefended,
        set.images.view(),
        &labels,
        1,
        clean_noise,
        0,
    )?;
    let fresh = {
        let counts = |t: &[Tally]| t.iter().map(|t| t.correct).collect::<Vec<u32>>();
        let clean = RunAccuracy::from_counts(&counts(&defended_clean), runs);
        AttackReport {
            tool: ToolInfo::this_build(),
            started: utc_now(),
            protocol: suite.protocol.map(|p| p.to_string()),
            grad_device: suite.grad_device,
            data: suite.data.file_name().map_or_else(
                || suite.data.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            ),
            images: n,
            // The models folder is a machine path; the files are named by their digests.
            config: DefenseConfig { models: None, ..config.clone() },
            harness: suite.harness.clone(),
            threats: suite.threats.iter().map(|t| t.to_string()).collect(),
            modes: suite.modes.clone(),
            counting: COUNTING.into(),
            clean_acc: clean.mean,
            clean_acc_worst: clean.worst,
            clean_acc_majority: clean.majority,
            undefended_clean_acc: RunAccuracy::from_counts(&counts(&bare_clean), 1).mean,
            results: Vec::new(),
            summary: Vec::new(),
            unbounded_probe: suite
                .unbounded_probe
                .then(|| super::report::CellReport::new(PROBE_THREAT, probe_mode(&suite.modes))),
            sanity: Vec::new(),
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
            AttackReport {
                results: saved.results,
                unbounded_probe: saved.unbounded_probe,
                seconds: saved.seconds,
                started: saved.started,
                ..fresh
            }
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
        for &mode in &suite.modes {
            let cell = u32::try_from(ti * CELLS_PER_THREAT + mode.index() + 1)
                .ok()
                .filter(|&c| c < PROBE_CELL)
                .ok_or_else(|| Error::InvalidConfig("too many threat models".into()))?;
            for &(a, b) in &batches {
                progress(SuiteProgress { done, total, mode, threat });
                done += 1;
                if (a..b).all(|i| report.cell_mut(*threat, mode).has(i)) {
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
                let clean = if mode.evaluates_defended() { &defended_clean } else { &bare_clean };
                let outcomes = with_clean_predictions(outcomes, &clean[a..b]);
                report.cell_mut(*threat, mode).add(outcomes, runs, t0.elapsed().as_secs_f64());
                report.seconds = seconds_before + started.elapsed().as_secs_f64();
                report.summarise(runs);
                save(&report)?;
            }
        }
    }
    if suite.unbounded_probe {
        let m = n.min(PROBE_IMAGES);
        let mode = probe_mode(&suite.modes);
        let finished = report.unbounded_probe.as_ref().is_some_and(|p| p.images >= m);
        if !finished {
            progress(SuiteProgress { done, total, mode, threat: &PROBE_THREAT });
            let t0 = Instant::now();
            let probe = HarnessConfig {
                attacks: vec![AttackSpec::pgd(20, None, Loss::CrossEntropy, false)],
                eot: suite.harness.eot.clamp(1, 4),
                runs,
                seed: suite.harness.seed,
            };
            let x = set.images.slice(s![0..m, .., .., ..]);
            let outcomes = run_cell(
                &mut pipeline,
                &mut twins,
                &probe,
                PROBE_THREAT,
                mode,
                x,
                &labels[..m],
                0,
                PROBE_CELL,
            )?;
            let clean = if mode.evaluates_defended() { &defended_clean } else { &bare_clean };
            let outcomes = with_clean_predictions(outcomes, &clean[..m]);
            let mut cell = super::report::CellReport::new(PROBE_THREAT, mode);
            cell.add(outcomes, runs, t0.elapsed().as_secs_f64());
            report.unbounded_probe = Some(cell);
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
    Ok(SuiteOutcome { warnings: report.failed_checks(), report, markdown, below })
}

/// The unbounded-eps probe's threat: any image in the \[0,1\] box is allowed.
const PROBE_THREAT: ThreatModel = ThreatModel { norm: Norm::Linf, eps: 1.0 };

/// The probe attacks with BPDA (cheap, and exact enough when any image is allowed) when the
/// suite evaluates the defence, else the bare classifier.
fn probe_mode(modes: &[AttackMode]) -> AttackMode {
    if modes.iter().any(|m| m.evaluates_defended()) {
        AttackMode::Bpda
    } else {
        AttackMode::Undefended
    }
}

fn with_clean_predictions(mut outcome: CellOutcome, clean: &[Tally]) -> CellOutcome {
    for (o, t) in outcome.images.iter_mut().zip(clean) {
        o.clean_pred = t.predicted;
    }
    outcome
}

/// Now, UTC, as RFC 3339 to the second (`2026-12-01T12:34:56Z`).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }
}
