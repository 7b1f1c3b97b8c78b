//! The attack report: every parameter, per-image outcomes, per-cell accuracies, the paper's
//! averages, as JSON (written after every finished batch, so a killed run keeps what it
//! measured and can resume), a Markdown table in the layout of the paper's Table 2, and JUnit
//! XML for regression runs on a device.

use super::eval::RunAccuracy;
use super::gradients::AttackMode;
use super::harness::{AttackUsed, CellOutcome, Cost, HarnessConfig, ImageOutcome};
use super::AttackKind;
use super::{Norm, ThreatModel};
use crate::config::DefenseConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One crafting attack's results in a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackResult {
    /// The attack and the settings it ran with (step size as used).
    #[serde(flatten)]
    pub used: AttackUsed,
    /// Mean over runs of the fraction of its adversarial images classified correctly.
    pub robust_acc: f64,
    /// Fraction correct in every run.
    pub robust_acc_worst: f64,
    /// Fraction correct in more than half of the runs.
    pub robust_acc_majority: f64,
    /// What crafting cost, summed over the cell's images.
    pub cost: Cost,
    /// Forward passes of either network per image while crafting (`number_forward_passes`).
    pub forward_passes_per_image: f64,
}

/// Results of one (threat model, mode) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellReport {
    /// Threat model, e.g. `linf:8/255`.
    pub threat: String,
    /// The same as `{norm, eps}` (eps in \[0,1\] pixel units).
    pub threat_model: ThreatModel,
    /// How the attacker got its gradient.
    pub mode: AttackMode,
    /// Mean over runs of the fraction of images classified correctly, per image the worst of
    /// the attacks.
    pub robust_acc: f64,
    /// Fraction correct in every run (per image the worst attack).
    pub robust_acc_worst: f64,
    /// Fraction correct in more than half of the runs (per image the worst attack).
    pub robust_acc_majority: f64,
    /// Images attacked so far.
    pub images: usize,
    /// Largest distance of a counted adversarial image from its clean image (norm of the threat).
    pub max_distance: f64,
    /// Wall time spent on this cell, seconds.
    pub seconds: f64,
    /// Each crafting attack on its own, in order.
    pub attacks: Vec<AttackResult>,
    /// Per-image outcomes, in data order.
    pub per_image: Vec<ImageOutcome>,
}

impl CellReport {
    /// An empty cell.
    pub fn new(threat: ThreatModel, mode: AttackMode) -> Self {
        Self {
            threat: threat.to_string(),
            threat_model: threat,
            mode,
            robust_acc: 0.0,
            robust_acc_worst: 0.0,
            robust_acc_majority: 0.0,
            images: 0,
            max_distance: 0.0,
            seconds: 0.0,
            attacks: Vec::new(),
            per_image: Vec::new(),
        }
    }

    /// Adds a finished batch and recomputes the accuracies.
    pub fn add(&mut self, batch: CellOutcome, runs: u32, seconds: f64) {
        self.per_image.extend(batch.images);
        self.per_image.sort_by_key(|o| o.index);
        self.seconds += seconds;
        for (k, (used, cost)) in batch.attacks.into_iter().enumerate() {
            match self.attacks.get_mut(k) {
                Some(a) => a.cost.add(cost),
                None => self.attacks.push(AttackResult {
                    used,
                    robust_acc: 0.0,
                    robust_acc_worst: 0.0,
                    robust_acc_majority: 0.0,
                    cost,
                    forward_passes_per_image: 0.0,
                }),
            }
        }
        let counts: Vec<u32> = self.per_image.iter().map(|o| o.runs_correct).collect();
        let acc = RunAccuracy::from_counts(&counts, runs);
        self.robust_acc = acc.mean;
        self.robust_acc_worst = acc.worst;
        self.robust_acc_majority = acc.majority;
        self.images = self.per_image.len();
        self.max_distance = self.per_image.iter().fold(0.0, |m, o| m.max(o.distance));
        for (k, a) in self.attacks.iter_mut().enumerate() {
            let counts: Vec<u32> = self
                .per_image
                .iter()
                .map(|o| o.by_attack.get(k).map_or(0, |b| b.runs_correct))
                .collect();
            let acc = RunAccuracy::from_counts(&counts, runs);
            a.robust_acc = acc.mean;
            a.robust_acc_worst = acc.worst;
            a.robust_acc_majority = acc.majority;
            a.forward_passes_per_image = a.cost.forward_passes() as f64 / self.images.max(1) as f64;
        }
    }

    /// Whether the image with data index `index` is done.
    pub fn has(&self, index: usize) -> bool {
        self.per_image.iter().any(|o| o.index == index)
    }
}

/// The paper's two averages for one mode across threat models.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModeSummary {
    /// The attack mode.
    pub mode: AttackMode,
    /// AwT: robust accuracy averaged over the threat models.
    pub awt: f64,
    /// AoA: accuracy over all attacks, per image the worst of its threat models (fraction of runs
    /// correct), averaged over the images every threat model has finished.
    pub aoa: f64,
}

/// The tool that wrote a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// `diffshield`.
    pub name: String,
    /// The crate version.
    pub version: String,
    /// The git commit it was built from (`unknown` outside a git checkout).
    pub commit: String,
}

impl ToolInfo {
    /// This build.
    pub fn this_build() -> Self {
        Self {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            commit: option_env!("DIFFSHIELD_COMMIT").unwrap_or("unknown").into(),
        }
    }
}

/// Whether a sanity check held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SanityStatus {
    /// It held.
    Passed,
    /// It did not: the attack or its gradients are suspect.
    Failed,
    /// The run has nothing it could be checked on (the detail says what it needs).
    NotRun,
}

/// One of the field's sanity checks for an adversarial evaluation (Carlini et al. 2019).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SanityCheck {
    /// Its name, e.g. `iterative-beats-one-step`.
    pub check: String,
    /// Whether it held.
    pub status: SanityStatus,
    /// What was compared, or what the check needs.
    pub detail: String,
}

/// A whole harness run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackReport {
    /// The tool, version and commit that wrote it.
    pub tool: ToolInfo,
    /// When the run started (UTC, RFC 3339).
    pub started: String,
    /// The protocol preset the run started from (`paper`, `strict`), if any; `harness` holds
    /// what actually ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Where the twins computed the gradients.
    #[serde(default)]
    pub grad_device: crate::grad::GradDevice,
    /// Data file attacked: its file name (no machine path; its SHA-256 is in `fingerprints`).
    pub data: String,
    /// Images requested.
    pub images: usize,
    /// Defence configuration of the deployed pipeline.
    pub config: DefenseConfig,
    /// Attack settings.
    pub harness: HarnessConfig,
    /// Threat models, in order.
    pub threats: Vec<String>,
    /// Modes, in order.
    pub modes: Vec<AttackMode>,
    /// How the accuracies are counted.
    pub counting: String,
    /// Defended clean accuracy (mean over runs).
    pub clean_acc: f64,
    /// Defended clean accuracy, correct in every run.
    pub clean_acc_worst: f64,
    /// Defended clean accuracy, correct in most runs.
    pub clean_acc_majority: f64,
    /// The bare classifier's clean accuracy.
    pub undefended_clean_acc: f64,
    /// One entry per (threat, mode).
    pub results: Vec<CellReport>,
    /// AwT and AoA per mode.
    pub summary: Vec<ModeSummary>,
    /// The unbounded-eps probe (Linf eps 1, BPDA PGD on the first images), when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unbounded_probe: Option<CellReport>,
    /// The sanity checks, as of the last save.
    #[serde(default)]
    pub sanity: Vec<SanityCheck>,
    /// True once every cell has every image.
    pub complete: bool,
    /// Wall time, seconds (summed over resumed sessions).
    pub seconds: f64,
    /// `sha256:` digests of the data file and of every model file the run used, by role
    /// (`data`, `classifier`, `denoiser`): `--resume` refuses a changed file.
    #[serde(default)]
    pub fingerprints: std::collections::BTreeMap<String, String>,
}

/// How the report counts, stated in every report.
pub const COUNTING: &str = "robust_acc = mean over runs of the fraction correct (one-shot); \
     robust_acc_worst = correct in every run (worst-of-N); robust_acc_majority = correct in more \
     than half the runs (majority-of-N); each run purifies with fresh noise on the deployed \
     backend (known-noise cells: the attacker's noise in every run); per image the worst of the \
     cell's attacks counts; AwT = mean robust_acc over threat models; AoA = per image the worst \
     threat model, averaged";

/// A sanity check, the slack of the comparisons it makes: two images' worth.
fn slack(images: usize) -> f64 {
    2.0 / images.max(1) as f64 + 1e-9
}

impl AttackReport {
    /// Recomputes the per-mode averages, the sanity checks and the completion flag.
    pub fn summarise(&mut self, runs: u32) {
        self.summary = self
            .modes
            .iter()
            .map(|&mode| {
                let cells: Vec<&CellReport> =
                    self.results.iter().filter(|c| c.mode == mode).collect();
                let awt =
                    cells.iter().map(|c| c.robust_acc).sum::<f64>() / cells.len().max(1) as f64;
                let common: Vec<usize> = cells
                    .first()
                    .map(|c| c.per_image.iter().map(|o| o.index).collect())
                    .unwrap_or_default();
                let common: Vec<usize> =
                    common.into_iter().filter(|&i| cells.iter().all(|c| c.has(i))).collect();
                let worst = |i: usize| {
                    cells
                        .iter()
                        .filter_map(|c| c.per_image.iter().find(|o| o.index == i))
                        .map(|o| f64::from(o.runs_correct) / f64::from(runs.max(1)))
                        .fold(1.0, f64::min)
                };
                let aoa =
                    common.iter().map(|&i| worst(i)).sum::<f64>() / common.len().max(1) as f64;
                ModeSummary { mode, awt, aoa }
            })
            .collect();
        self.complete = self.results.len() == self.threats.len() * self.modes.len()
            && self.results.iter().all(|c| c.images == self.images);
        self.sanity = self.sanity_checks();
    }

    /// The cell of (threat, mode), created if missing.
    pub fn cell_mut(&mut self, threat: ThreatModel, mode: AttackMode) -> &mut CellReport {
        let name = threat.to_string();
        let pos = self.results.iter().position(|c| c.threat == name && c.mode == mode);
        match pos {
            Some(i) => &mut self.results[i],
            None => {
                self.results.push(CellReport::new(threat, mode));
                self.results.last_mut().expect("just pushed")
            }
        }
    }

    /// The sanity checks that failed, in words.
    pub fn failed_checks(&self) -> Vec<String> {
        self.sanity
            .iter()
            .filter(|c| c.status == SanityStatus::Failed)
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect()
    }

    /// The field's sanity checks on the finished cells (Carlini et al. 2019): eps 0 reproduces
    /// the clean accuracy; within a mode and norm accuracy does not rise with eps; undefended
    /// iterative attacks at Linf 8/255 or more reach near zero; an iterative attack does at
    /// least as well as a one-step one; a gradient-free attack does no better than the gradient
    /// ones (else the gradients are broken); the worst over all attacks gains little over the
    /// best single one (else none converged); an unbounded eps reaches zero. Differences within
    /// two images' worth are tolerated.
    pub fn sanity_checks(&self) -> Vec<SanityCheck> {
        let tolerated = slack(self.images);
        let done: Vec<&CellReport> =
            self.results.iter().filter(|c| c.images == self.images && c.images > 0).collect();
        let pct = |v: f64| format!("{:.1} %", 100.0 * v);
        let mut out = Vec::new();
        let mut push = |check: &str, results: Vec<(bool, String)>, needs: &str| {
            let status = if results.is_empty() {
                SanityStatus::NotRun
            } else if results.iter().all(|(ok, _)| *ok) {
                SanityStatus::Passed
            } else {
                SanityStatus::Failed
            };
            let detail = if results.is_empty() {
                needs.to_string()
            } else {
                let shown: Vec<&str> = results
                    .iter()
                    .filter(|(ok, _)| status == SanityStatus::Passed || !ok)
                    .map(|(_, d)| d.as_str())
                    .collect();
                shown.join("; ")
            };
            out.push(SanityCheck { check: check.into(), status, detail });
        };

        let mut r = Vec::new();
        for c in done.iter().filter(|c| c.threat_model.eps == 0.0) {
            let clean = self.clean_of(c.mode);
            r.push((
                (c.robust_acc - clean).abs() <= tolerated + 0.1,
                format!("{} at eps 0: {} vs clean {}", c.mode, pct(c.robust_acc), pct(clean)),
            ));
        }
        push("eps-0-is-clean", r, "needs a threat with eps 0");

        let mut r = Vec::new();
        for c in &done {
            for d in &done {
                let (t, u) = (c.threat_model, d.threat_model);
                if d.mode == c.mode && u.norm == t.norm && u.eps > t.eps {
                    r.push((
                        d.robust_acc <= c.robust_acc + tolerated,
                        format!(
                            "{}: {} {} then {} {}",
                            c.mode,
                            c.threat,
                            pct(c.robust_acc),
                            d.threat,
                            pct(d.robust_acc)
                        ),
                    ));
                }
            }
        }
        push("accuracy-falls-with-eps", r, "needs two radii of one norm in one mode");

        let mut r = Vec::new();
        for c in done.iter().filter(|c| {
            c.mode == AttackMode::Undefended
                && c.threat_model.norm == Norm::Linf
                && c.threat_model.eps >= 8.0 / 255.0 - 1e-9
        }) {
            let best = c
                .attacks
                .iter()
                .filter(|a| a.used.spec.gradient_steps() >= 10)
                .map(|a| a.robust_acc)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
            if let Some(best) = best {
                r.push((best <= 0.1, format!("undefended {}: {}", c.threat, pct(best))));
            }
        }
        push(
            "undefended-reaches-zero",
            r,
            "needs the undefended mode at Linf >= 8/255 with a gradient attack of >= 10 steps",
        );

        let mut r = Vec::new();
        for c in &done {
            let one = c
                .attacks
                .iter()
                .find(|a| a.used.spec.kind == AttackKind::Pgd && a.used.spec.steps == Some(1));
            let many = c
                .attacks
                .iter()
                .filter(|a| a.used.spec.gradient_steps() > 1)
                .min_by(|a, b| a.robust_acc.total_cmp(&b.robust_acc));
            if let (Some(one), Some(many)) = (one, many) {
                r.push((
                    many.robust_acc <= one.robust_acc + tolerated,
                    format!(
                        "{} {}: {} {} vs {} {}",
                        c.mode,
                        c.threat,
                        many.used.name,
                        pct(many.robust_acc),
                        one.used.name,
                        pct(one.robust_acc)
                    ),
                ));
            }
        }
        push(
            "iterative-beats-one-step",
            r,
            "needs a one-step PGD (pgd-1) next to an iterative attack",
        );

        let mut r = Vec::new();
        for c in &done {
            let free = c.attacks.iter().find(|a| a.used.spec.kind == AttackKind::Square);
            let grad = c
                .attacks
                .iter()
                .filter(|a| a.used.spec.kind != AttackKind::Square)
                .min_by(|a, b| a.robust_acc.total_cmp(&b.robust_acc));
            if let (Some(free), Some(grad)) = (free, grad) {
                r.push((
                    free.robust_acc + tolerated >= grad.robust_acc,
                    format!(
                        "{} {}: {} {} vs {} {}",
                        c.mode,
                        c.threat,
                        free.used.name,
                        pct(free.robust_acc),
                        grad.used.name,
                        pct(grad.robust_acc)
                    ),
                ));
            }
        }
        push("gradient-free-not-better", r, "needs Square next to a gradient attack");

        let mut r = Vec::new();
        for c in done.iter().filter(|c| c.attacks.len() > 1) {
            let best = c.attacks.iter().map(|a| a.robust_acc).fold(1.0, f64::min);
            let tolerance = tolerated.max(0.05);
            r.push((
                best - c.robust_acc <= tolerance,
                format!(
                    "{} {}: worst over attacks {} vs best single {}",
                    c.mode,
                    c.threat,
                    pct(c.robust_acc),
                    pct(best)
                ),
            ));
        }
        push("more-attacks-no-gain", r, "needs two or more attacks in a cell");

        let mut r = Vec::new();
        if let Some(p) = self.unbounded_probe.as_ref().filter(|p| p.images > 0) {
            r.push((
                p.robust_acc <= slack(p.images),
                format!("{} {} on {} images: {}", p.mode, p.threat, p.images, pct(p.robust_acc)),
            ));
        }
        push("unbounded-eps-reaches-zero", r, "needs the unbounded-eps probe (--sanity-probe)");
        out
    }

    fn clean_of(&self, mode: AttackMode) -> f64 {
        if mode.evaluates_defended() {
            self.clean_acc
        } else {
            self.undefended_clean_acc
        }
    }

    /// Reads a report written by [`crate::attack::suite::run_suite`].
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = crate::files::read_input_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::InvalidConfig(format!(
                "--resume: {} is not an attack report of this version: {e}",
                path.display()
            ))
        })
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Backend(format!("attack report: {e}")))
    }

    /// Whether this saved report can be continued by a run that would start as `other`: the
    /// same data, models (by fingerprint), defence (any thread count), attack, threats and
    /// modes, and at least as many images. The error names every difference.
    pub fn resumable_with(&self, other: &AttackReport) -> Result<()> {
        let mut diffs = Vec::new();
        if self.data != other.data {
            diffs.push(format!("data {} (saved) vs {}", self.data, other.data));
        }
        // Threads change the speed, never the bits (tests/pipeline.rs), so a run may go on with
        // another count: on another machine, or under another default (one per core).
        let threads_as_saved =
            DefenseConfig { threads: self.config.threads, ..other.config.clone() };
        diff_json("config", &self.config, &threads_as_saved, &mut diffs);
        diff_json("attack", &self.harness, &other.harness, &mut diffs);
        if self.threats != other.threats {
            diffs.push(format!("threats {:?} (saved) vs {:?}", self.threats, other.threats));
        }
        if self.modes != other.modes {
            diffs.push(format!("modes {:?} (saved) vs {:?}", self.modes, other.modes));
        }
        if self.unbounded_probe.is_some() != other.unbounded_probe.is_some() {
            diffs.push("the unbounded-eps probe is on in one run and off in the other".into());
        }
        for (role, now) in &other.fingerprints {
            match self.fingerprints.get(role) {
                Some(saved) if saved == now => {}
                saved => diffs.push(format!(
                    "the {role} file changed ({} saved, {now} now)",
                    saved.map_or("none", String::as_str)
                )),
            }
        }
        let done = self.results.iter().map(|c| c.images).max().unwrap_or(0);
        if done > other.images {
            diffs.push(format!(
                "the saved run has {done} images, more than the {} asked for now (--limit)",
                other.images
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidConfig(format!(
                "--resume: the saved report differs: {}; use the same settings or a new --out",
                diffs.join("; ")
            )))
        }
    }

    /// The report as a Markdown table in the layout of the paper's Table 2: one row per attack
    /// mode, the clean accuracy, one column per threat model, then AwT and AoA (percent); then
    /// one-shot / worst-of-N / majority-of-N per cell, each attack on its own, and the sanity
    /// checks.
    pub(crate) fn markdown(&self) -> String {
        let pct = |v: f64| format!("{:.1}", 100.0 * v);
        let mut s = String::new();
        let _ = write!(s, "| attack mode | clean |");
        for t in &self.threats {
            let _ = write!(s, " {t} |");
        }
        let _ = writeln!(s, " AwT | AoA |");
        let _ = writeln!(s, "|---|---|{}---|---|", "---|".repeat(self.threats.len()));
        for (m, summary) in self.modes.iter().zip(&self.summary) {
            let _ = write!(s, "| {m} | {} |", pct(self.clean_of(*m)));
            for t in &self.threats {
                let cell = self.results.iter().find(|c| &c.threat == t && c.mode == *m);
                let v = cell.map_or("–".to_string(), |c| {
                    if c.images == self.images {
                        pct(c.robust_acc)
                    } else {
                        format!("{} ({}/{})", pct(c.robust_acc), c.images, self.images)
                    }
                });
                let _ = write!(s, " {v} |");
            }
            let _ = writeln!(s, " {} | {} |", pct(summary.awt), pct(summary.aoa));
        }
        let runs = self.harness.runs;
        let _ = writeln!(
            s,
            "\n| cell | attack | one-shot | worst-of-{runs} | majority-of-{runs} | forward passes / image |\n|---|---|---|---|---|---|"
        );
        for c in &self.results {
            let rows = c.attacks.iter().map(|a| {
                (
                    a.used.name.clone(),
                    a.robust_acc,
                    a.robust_acc_worst,
                    a.robust_acc_majority,
                    Some(a.forward_passes_per_image),
                )
            });
            let all = (c.attacks.len() > 1).then(|| {
                (
                    "worst of all".to_string(),
                    c.robust_acc,
                    c.robust_acc_worst,
                    c.robust_acc_majority,
                    None,
                )
            });
            for (name, mean, worst, majority, passes) in rows.chain(all) {
                let _ = writeln!(
                    s,
                    "| {} {} | {name} | {} | {} | {} | {} |",
                    c.mode,
                    c.threat,
                    pct(mean),
                    pct(worst),
                    pct(majority),
                    passes.map_or(String::new(), |p| format!("{p:.0}"))
                );
            }
        }
        let ran: Vec<&SanityCheck> =
            self.sanity.iter().filter(|c| c.status != SanityStatus::NotRun).collect();
        if !ran.is_empty() {
            let _ = writeln!(s, "\nSanity checks:");
            for c in ran {
                let status = if c.status == SanityStatus::Passed { "passed" } else { "FAILED" };
                let _ = writeln!(s, "- {} {status}: {}", c.check, c.detail);
            }
        }
        let _ = writeln!(
            s,
            "\n{} images, {} evaluation runs each; attacks: {}; defence: denoiser {}, T*={}, \
             eta {}, {} vote(s); gradients on {}; {} {} ({}), started {}.",
            self.images,
            runs,
            self.harness.describe(),
            self.config.denoiser,
            self.config.t_star,
            self.config.eta,
            self.config.votes,
            self.grad_device,
            self.tool.name,
            self.tool.version,
            self.tool.commit,
            self.started
        );
        s
    }

    /// JUnit XML: one test case per (threat, mode), failing when its robust accuracy is below
    /// the threshold `min_acc` gives for it (`None`: no threshold, always passes), and one per
    /// sanity check, failing when it failed and skipped when it could not run.
    pub(crate) fn junit(&self, min_acc: &dyn Fn(AttackMode, &str) -> Option<f64>) -> String {
        let mut cases = String::new();
        let mut failures = 0;
        for c in &self.results {
            let name = format!("{} {}", c.mode, c.threat);
            let _ = write!(
                cases,
                "  <testcase classname=\"diffshield.attack\" name=\"{}\" time=\"{:.3}\">",
                xml_escape(&name),
                c.seconds
            );
            if let Some(min) = min_acc(c.mode, &c.threat) {
                if c.robust_acc < min {
                    failures += 1;
                    let _ = write!(
                        cases,
                        "<failure message=\"robust_acc {:.4} below min-acc {min:.4} ({} images)\"/>",
                        c.robust_acc, c.images
                    );
                }
            }
            let _ = writeln!(cases, "</testcase>");
        }
        let mut skipped = 0;
        for c in &self.sanity {
            let _ = write!(
                cases,
                "  <testcase classname=\"diffshield.sanity\" name=\"{}\">",
                xml_escape(&c.check)
            );
            let detail = xml_escape(&c.detail);
            match c.status {
                SanityStatus::Passed => {}
                SanityStatus::Failed => {
                    failures += 1;
                    let _ = write!(cases, "<failure message=\"{detail}\"/>");
                }
                SanityStatus::NotRun => {
                    skipped += 1;
                    let _ = write!(cases, "<skipped message=\"{detail}\"/>");
                }
            }
            let _ = writeln!(cases, "</testcase>");
        }
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"diffshield-attack\" \
             tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">\n{cases}</testsuite>\n",
            self.results.len() + self.sanity.len(),
            self.seconds
        )
    }
}

/// Adds to `diffs` every top-level key whose value differs between two serialisable settings.
fn diff_json<T: Serialize>(what: &str, saved: &T, now: &T, diffs: &mut Vec<String>) {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(now))
    else {
        return;
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x != y {
            let show = |v: Option<&serde_json::Value>| v.map_or("unset".into(), |v| v.to_string());
            diffs.push(format!("{what} {k} = {} (saved) vs {}", show(x), show(y)));
        }
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Reports round-trip and count as documented (moved here from tests/pgd.rs when the writers
/// became crate-private).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::harness::{AttackOutcome, AttackSpec};
    use crate::grad::Loss;

    /// One image's outcome under attacks that left `by` correct runs each.
    fn outcome(index: usize, by: &[u32]) -> ImageOutcome {
        ImageOutcome {
            index,
            label: index % 10,
            clean_pred: Some(index % 10),
            runs_correct: by.iter().copied().min().unwrap_or(0),
            distance: 0.01,
            by_attack: by
                .iter()
                .map(|&c| AttackOutcome { runs_correct: c, predicted: None, distance: 0.01 })
                .collect(),
        }
    }

    fn batch(images: Vec<ImageOutcome>, attacks: &[AttackSpec]) -> CellOutcome {
        let t: ThreatModel = "linf:8/255".parse().unwrap();
        let used = attacks.iter().flat_map(|a| a.crafting(t, 2)).map(|(u, _)| {
            (u, Cost { purifications: 4, denoiser_passes: 56, classifier_passes: 4 })
        });
        CellOutcome { images, attacks: used.collect() }
    }

    fn report(attacks: Vec<AttackSpec>) -> AttackReport {
        AttackReport {
            tool: ToolInfo::this_build(),
            started: "2026-12-01T00:00:00Z".into(),
            protocol: None,
            grad_device: Default::default(),
            data: "x.bin".into(),
            images: 2,
            config: DefenseConfig::default(),
            harness: HarnessConfig { attacks, eot: 2, runs: 4, seed: 0 },
            threats: vec!["linf:8/255".into(), "l2:1".into()],
            modes: vec![AttackMode::Bpda, AttackMode::WhiteBox],
            counting: COUNTING.into(),
            clean_acc: 0.75,
            clean_acc_worst: 0.5,
            clean_acc_majority: 0.5,
            undefended_clean_acc: 1.0,
            results: Vec::new(),
            summary: Vec::new(),
            unbounded_probe: None,
            sanity: Vec::new(),
            complete: false,
            seconds: 1.0,
            fingerprints: Default::default(),
        }
    }

    fn pgd10() -> Vec<AttackSpec> {
        vec![AttackSpec::pgd(10, None, Loss::CrossEntropy, true)]
    }

    fn filled() -> AttackReport {
        let mut r = report(pgd10());
        let (linf, l2) = ("linf:8/255".parse().unwrap(), "l2:1".parse().unwrap());
        let a = pgd10();
        r.cell_mut(linf, AttackMode::Bpda).add(
            batch(vec![outcome(0, &[4]), outcome(1, &[1])], &a),
            4,
            0.5,
        );
        r.cell_mut(l2, AttackMode::Bpda).add(
            batch(vec![outcome(0, &[2]), outcome(1, &[3])], &a),
            4,
            0.5,
        );
        r.cell_mut(linf, AttackMode::WhiteBox).add(batch(vec![outcome(1, &[0])], &a), 4, 0.5);
        r.summarise(4);
        r
    }

    #[test]
    fn reports_count_as_documented_and_round_trip() {
        let r = filled();
        let bpda = &r.results[0];
        assert_eq!(bpda.robust_acc, (1.0 + 0.25) / 2.0);
        assert_eq!(bpda.robust_acc_worst, 0.5);
        assert_eq!(bpda.robust_acc_majority, 0.5);
        assert_eq!(bpda.threat_model.eps, 8.0 / 255.0);
        assert_eq!(bpda.attacks.len(), 1);
        assert_eq!(
            bpda.attacks[0].used.spec.step_size,
            Some(2.0 / 255.0),
            "the size used is recorded"
        );
        assert_eq!(bpda.attacks[0].forward_passes_per_image, 60.0 / 2.0, "60 passes on 2 images");
        // AwT: mean over threat models; AoA: per image the worst threat model.
        let s = r.summary[0];
        assert_eq!(s.awt, (0.625 + 0.625) / 2.0);
        assert_eq!(s.aoa, (0.5 + 0.25) / 2.0);
        assert!(!r.complete, "white-box has one image of two and no l2 cell");
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("\"queries\""), "Square's setting is left out of a PGD run");
        let back: AttackReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(back.resumable_with(&r).is_ok());
        let mut other = r.clone();
        other.config.threads = r.config.threads + 1;
        assert!(back.resumable_with(&other).is_ok(), "threads never change the results");
        other.config.votes = r.config.votes + 1;
        let e = back.resumable_with(&other).unwrap_err().to_string();
        assert!(e.contains("config votes") && !e.contains("threads"), "{e}");
        let mut other = r.clone();
        other.harness.eot = 3;
        assert!(back.resumable_with(&other).is_err());
    }

    #[test]
    fn markdown_and_junit_show_every_cell() {
        let r = filled();
        let md = r.markdown();
        assert!(md.contains("| attack mode | clean | linf:8/255 | l2:1 | AwT | AoA |"), "{md}");
        assert!(md.contains("| bpda | 75.0 | 62.5 | 62.5 | 62.5 | 37.5 |"), "{md}");
        assert!(md.contains("0.0 (1/2)"), "a partial cell says so: {md}");
        assert!(md.contains("| bpda linf:8/255 | pgd-10 | 62.5 | 50.0 | 50.0 | 30 |"), "{md}");
        assert!(!md.contains("Pgd") && !md.contains("CrossEntropy"), "no debug names: {md}");
        let cells = |xml: &str| xml.matches("classname=\"diffshield.attack\"").count();
        let xml = r.junit(&|m, _| (m == AttackMode::Bpda).then_some(0.6));
        assert!(xml.contains("failures=\"0\""), "{xml}");
        assert_eq!(cells(&xml), 3);
        let xml = r.junit(&|_, _| Some(0.7));
        assert!(xml.contains("failures=\"3\""), "{xml}");
        assert!(xml.contains("robust_acc 0.6250 below min-acc 0.7000"), "{xml}");
        assert!(xml.contains("<skipped message=\"needs Square"), "{xml}");
    }

    fn status(r: &AttackReport, check: &str) -> SanityStatus {
        r.sanity.iter().find(|c| c.check == check).map(|c| c.status).expect(check)
    }

    #[test]
    fn sanity_checks_flag_a_weak_iterative_attack_and_broken_gradients() {
        let attacks = vec![
            AttackSpec::pgd(20, None, Loss::CrossEntropy, true),
            AttackSpec::pgd(1, None, Loss::CrossEntropy, false),
            AttackSpec::square(100),
        ];
        let linf: ThreatModel = "linf:8/255".parse().unwrap();
        let mut r = report(attacks.clone());
        r.threats = vec!["linf:8/255".into()];
        r.modes = vec![AttackMode::Bpda];
        r.images = 4;
        // PGD-20 leaves 4 of 4 runs right where one step leaves none: the iterative attack is
        // broken; Square does better than both gradient attacks: the gradients are suspect.
        let imgs = (0..4).map(|i| outcome(i, &[4, 0, 0])).collect();
        r.cell_mut(linf, AttackMode::Bpda).add(batch(imgs, &attacks), 4, 0.1);
        r.summarise(4);
        assert_eq!(status(&r, "iterative-beats-one-step"), SanityStatus::Failed, "{:?}", r.sanity);
        assert_eq!(status(&r, "gradient-free-not-better"), SanityStatus::Passed, "{:?}", r.sanity);
        assert_eq!(status(&r, "eps-0-is-clean"), SanityStatus::NotRun);
        let xml = r.junit(&|_, _| None);
        assert!(xml.contains("name=\"iterative-beats-one-step\"><failure"), "{xml}");
        assert_eq!(r.failed_checks().len(), 1, "{:?}", r.failed_checks());

        let mut r2 = report(attacks.clone());
        (r2.threats, r2.modes, r2.images) = (vec!["linf:8/255".into()], vec![AttackMode::Bpda], 4);
        let imgs = (0..4).map(|i| outcome(i, &[3, 4, 0])).collect();
        r2.cell_mut(linf, AttackMode::Bpda).add(batch(imgs, &attacks), 4, 0.1);
        r2.summarise(4);
        assert_eq!(
            status(&r2, "gradient-free-not-better"),
            SanityStatus::Failed,
            "{:?}",
            r2.sanity
        );
        assert_eq!(status(&r2, "iterative-beats-one-step"), SanityStatus::Passed);
        assert_eq!(
            status(&r2, "more-attacks-no-gain"),
            SanityStatus::Passed,
            "square is best alone"
        );

        let mut r3 = report(attacks.clone());
        (r3.threats, r3.modes, r3.images) = (vec!["linf:8/255".into()], vec![AttackMode::Bpda], 8);
        // Each attack alone fools 2 of 8 images, different ones, so together 6 of 8.
        let imgs = (0..8)
            .map(|i| {
                let by: Vec<u32> = (0..3).map(|k| if i / 2 == k { 0 } else { 4 }).collect();
                outcome(i, &by)
            })
            .collect();
        r3.cell_mut(linf, AttackMode::Bpda).add(batch(imgs, &attacks), 4, 0.1);
        r3.summarise(4);
        assert_eq!(
            status(&r3, "more-attacks-no-gain"),
            SanityStatus::Failed,
            "each attack alone leaves 75 %, together 25 %: none converged: {:?}",
            r3.sanity
        );
    }
}
