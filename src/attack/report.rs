//! The attack report: every parameter, per-image outcomes, per-cell accuracies, the paper's
//! averages, as JSON (written after every finished batch, so a killed run keeps what it
//! measured and can resume), a Markdown table in the layout of the paper's Table 2, and JUnit
//! XML for regression runs on a device.

use super::eval::RunAccuracy;
use super::gradients::AttackMode;
use super::harness::{HarnessConfig, ImageOutcome};
use super::AttackKind;
use super::{Norm, ThreatModel};
use crate::config::DefenseConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Results of one (threat model, mode) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellReport {
    /// Threat model, e.g. `linf:8/255`.
    pub threat: String,
    /// How the attacker got its gradient.
    pub mode: AttackMode,
    /// Mean over runs of the fraction of adversarial images classified correctly.
    pub robust_acc: f64,
    /// Fraction correct in every run.
    pub robust_acc_worst: f64,
    /// Fraction correct in more than half of the runs.
    pub robust_acc_majority: f64,
    /// Images attacked so far.
    pub images: usize,
    /// Largest distance of an adversarial image from its clean image (norm of the threat).
    pub max_distance: f64,
    /// Wall time spent on this cell, seconds.
    pub seconds: f64,
    /// Per-image outcomes, in data order.
    pub per_image: Vec<ImageOutcome>,
}

impl CellReport {
    /// An empty cell.
    pub fn new(threat: String, mode: AttackMode) -> Self {
        Self {
            threat,
            mode,
            robust_acc: 0.0,
            robust_acc_worst: 0.0,
            robust_acc_majority: 0.0,
            images: 0,
            max_distance: 0.0,
            seconds: 0.0,
            per_image: Vec::new(),
        }
    }

    /// Adds a finished batch and recomputes the accuracies.
    pub fn add(&mut self, batch: Vec<ImageOutcome>, runs: u32, seconds: f64) {
        self.per_image.extend(batch);
        self.per_image.sort_by_key(|o| o.index);
        self.seconds += seconds;
        let counts: Vec<u32> = self.per_image.iter().map(|o| o.runs_correct).collect();
        let acc = RunAccuracy::from_counts(&counts, runs);
        self.robust_acc = acc.mean;
        self.robust_acc_worst = acc.worst;
        self.robust_acc_majority = acc.majority;
        self.images = self.per_image.len();
        self.max_distance = self.per_image.iter().fold(0.0, |m, o| m.max(o.distance));
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

/// A whole harness run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackReport {
    /// Data file attacked.
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
    /// True once every cell has every image.
    pub complete: bool,
    /// Wall time, seconds (summed over resumed sessions).
    pub seconds: f64,
    /// FNV-1a fingerprints (16 hex digits) of the data file and of every model file the run
    /// used, by role (`data`, `classifier`, `denoiser`): `--resume` refuses a changed file.
    #[serde(default)]
    pub fingerprints: std::collections::BTreeMap<String, String>,
}

/// How the report counts, stated in every report.
pub const COUNTING: &str = "robust_acc = mean over runs of the fraction correct; \
     robust_acc_worst = correct in every run; robust_acc_majority = correct in more than half \
     the runs; each run purifies with fresh noise on the deployed backend; AwT = mean robust_acc \
     over threat models; AoA = per image the worst threat model, averaged";

impl AttackReport {
    /// Recomputes the per-mode averages and the completion flag.
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
    }

    /// The cell of (threat, mode), created if missing.
    pub fn cell_mut(&mut self, threat: &str, mode: AttackMode) -> &mut CellReport {
        let pos = self.results.iter().position(|c| c.threat == threat && c.mode == mode);
        match pos {
            Some(i) => &mut self.results[i],
            None => {
                self.results.push(CellReport::new(threat.to_string(), mode));
                self.results.last_mut().expect("just pushed")
            }
        }
    }

    /// The field's sanity checks, as warnings (empty when all hold): undefended PGD at Linf
    /// 8/255 or more drives accuracy near zero; eps = 0 reproduces the clean accuracy; within a norm,
    /// accuracy does not rise with eps. Differences within two images' worth are tolerated.
    pub fn sanity_checks(&self) -> Vec<String> {
        let slack = 2.0 / self.images.max(1) as f64 + 1e-9;
        let mut out = Vec::new();
        let parsed: Vec<(&CellReport, ThreatModel)> = self
            .results
            .iter()
            .filter(|c| c.images == self.images)
            .filter_map(|c| c.threat.parse::<ThreatModel>().ok().map(|t| (c, t)))
            .collect();
        for (c, t) in &parsed {
            let clean = if c.mode.evaluates_defended() {
                self.clean_acc
            } else {
                self.undefended_clean_acc
            };
            if c.mode == AttackMode::Undefended
                && t.norm == Norm::Linf
                && t.eps >= 8.0 / 255.0 - 1e-9
                && self.harness.attack != AttackKind::Square
                && self.harness.steps >= 10
                && c.robust_acc > 0.1
            {
                out.push(format!(
                    "undefended PGD at {} left {:.1} % accuracy; expected near zero (a weak attack?)",
                    c.threat,
                    100.0 * c.robust_acc
                ));
            }
            if t.eps == 0.0 && (c.robust_acc - clean).abs() > slack + 0.1 {
                out.push(format!(
                    "{} at eps 0: {:.1} % differs from the clean {:.1} %",
                    c.mode,
                    100.0 * c.robust_acc,
                    100.0 * clean
                ));
            }
            for (d, u) in &parsed {
                if d.mode == c.mode
                    && u.norm == t.norm
                    && u.eps > t.eps
                    && d.robust_acc > c.robust_acc + slack
                {
                    out.push(format!(
                        "{}: accuracy rises with eps ({} {:.1} % > {} {:.1} %)",
                        c.mode,
                        d.threat,
                        100.0 * d.robust_acc,
                        c.threat,
                        100.0 * c.robust_acc
                    ));
                }
            }
        }
        out
    }

    /// Reads a report written by [`crate::attack::suite::run_suite`].
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::InvalidConfig(format!(
                "--resume: {} is not an attack report: {e}",
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
    /// same data, models (by fingerprint), defence, attack, threats and modes, and at least as
    /// many images. The error names every difference.
    pub fn resumable_with(&self, other: &AttackReport) -> Result<()> {
        let mut diffs = Vec::new();
        if self.data != other.data {
            diffs.push(format!("data {} (saved) vs {}", self.data, other.data));
        }
        diff_json("config", &self.config, &other.config, &mut diffs);
        diff_json("attack", &self.harness, &other.harness, &mut diffs);
        if self.threats != other.threats {
            diffs.push(format!("threats {:?} (saved) vs {:?}", self.threats, other.threats));
        }
        if self.modes != other.modes {
            diffs.push(format!("modes {:?} (saved) vs {:?}", self.modes, other.modes));
        }
        if self.fingerprints.is_empty() && !other.fingerprints.is_empty() {
            diffs.push(
                "the saved report has no file fingerprints (made by an older version)".into(),
            );
        } else {
            for (role, now) in &other.fingerprints {
                match self.fingerprints.get(role) {
                    Some(saved) if saved == now => {}
                    saved => diffs.push(format!(
                        "the {role} file changed (fingerprint {} saved, {now} now)",
                        saved.map_or("none", String::as_str)
                    )),
                }
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
    /// mode, the clean accuracy, one column per threat model, then AwT and AoA (percent).
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
            let clean =
                if m.evaluates_defended() { self.clean_acc } else { self.undefended_clean_acc };
            let _ = write!(s, "| {m} | {} |", pct(clean));
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
        let _ = writeln!(
            s,
            "\n{} images, {} evaluation runs each (robust_acc = mean over runs); attack: {}; \
             defence: denoiser {}, T*={}, eta {}, {} vote(s).",
            self.images,
            self.harness.runs,
            self.harness.describe(),
            self.config.denoiser,
            self.config.t_star,
            self.config.eta,
            self.config.votes
        );
        s
    }

    /// JUnit XML: one test case per (threat, mode), failing when its robust accuracy is below
    /// the threshold `min_acc` gives for it (`None`: no threshold, always passes).
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
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"diffshield-attack\" \
             tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">\n{cases}</testsuite>\n",
            self.results.len(),
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
    use crate::grad::Loss;

    fn outcome(index: usize, runs_correct: u32) -> ImageOutcome {
        ImageOutcome { index, label: index % 10, runs_correct, distance: 0.01 }
    }

    fn report() -> AttackReport {
        let mut r = AttackReport {
            data: "x.bin".into(),
            images: 2,
            config: DefenseConfig::default(),
            harness: HarnessConfig {
                attack: AttackKind::Pgd,
                steps: 10,
                step_size: None,
                eot: 2,
                queries: 0,
                runs: 4,
                seed: 0,
                loss: Loss::CrossEntropy,
                random_start: true,
            },
            threats: vec!["linf:8/255".into(), "l2:1".into()],
            modes: vec![AttackMode::Bpda, AttackMode::WhiteBox],
            counting: COUNTING.into(),
            clean_acc: 0.75,
            clean_acc_worst: 0.5,
            clean_acc_majority: 0.5,
            undefended_clean_acc: 1.0,
            results: Vec::new(),
            summary: Vec::new(),
            complete: false,
            seconds: 1.0,
            fingerprints: Default::default(),
        };
        r.cell_mut("linf:8/255", AttackMode::Bpda).add(vec![outcome(0, 4), outcome(1, 1)], 4, 0.5);
        r.cell_mut("l2:1", AttackMode::Bpda).add(vec![outcome(0, 2), outcome(1, 3)], 4, 0.5);
        r.cell_mut("linf:8/255", AttackMode::WhiteBox).add(vec![outcome(1, 0)], 4, 0.5);
        r.summarise(4);
        r
    }

    #[test]
    fn reports_count_as_documented_and_round_trip() {
        let r = report();
        let bpda = &r.results[0];
        assert_eq!(bpda.robust_acc, (1.0 + 0.25) / 2.0);
        assert_eq!(bpda.robust_acc_worst, 0.5);
        assert_eq!(bpda.robust_acc_majority, 0.5);
        // AwT: mean over threat models; AoA: per image the worst threat model.
        let s = r.summary[0];
        assert_eq!(s.awt, (0.625 + 0.625) / 2.0);
        assert_eq!(s.aoa, (0.5 + 0.25) / 2.0);
        assert!(!r.complete, "white-box has one image of two and no l2 cell");
        let text = serde_json::to_string(&r).unwrap();
        let back: AttackReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(back.resumable_with(&r).is_ok());
        let mut other = r.clone();
        other.harness.eot = 3;
        assert!(back.resumable_with(&other).is_err());
    }

    #[test]
    fn markdown_and_junit_show_every_cell() {
        let r = report();
        let md = r.markdown();
        assert!(md.contains("| attack mode | clean | linf:8/255 | l2:1 | AwT | AoA |"), "{md}");
        assert!(md.contains("| bpda | 75.0 | 62.5 | 62.5 | 62.5 | 37.5 |"), "{md}");
        assert!(md.contains("0.0 (1/2)"), "a partial cell says so: {md}");
        let xml = r.junit(&|m, _| (m == AttackMode::Bpda).then_some(0.6));
        assert!(xml.contains("tests=\"3\" failures=\"0\""), "{xml}");
        let xml = r.junit(&|_, _| Some(0.7));
        assert!(xml.contains("failures=\"3\""), "{xml}");
        assert!(xml.contains("robust_acc 0.6250 below min-acc 0.7000"), "{xml}");
    }
}
