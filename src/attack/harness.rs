//! The attack harness: one cell = (threat model, mode) on one batch of images. It crafts the
//! adversarial images with the mode's gradient (or Square's queries), then evaluates them on the
//! deployed pipeline with fresh noise, `runs` times. The caller drives the cells and batches,
//! so it can save after every batch and resume.

use super::eval::{correct_runs, Evaluated, ATTACK_FRAME_BASE};
use super::gradients::{AttackMode, BpdaGradient, ClassifierGradient, EotNoise, WhiteBoxGradient};
use super::pgd::{distances, pgd, PgdConfig};
use super::square::{square_attack, SquareConfig};
use super::{Norm, ThreatModel};
use crate::error::{Error, Result};
use crate::grad::{DifferentiableClassifier, DifferentiableDenoiser, Loss};
use crate::pipeline::Pipeline;
use ndarray::{Array2, Array4, ArrayView4};
use serde::{Deserialize, Serialize};

/// Separates the EOT noise streams from the pipeline's own (same seed value or not).
const EOT_SALT: u64 = 0x454f_545f_4e4f_4953;

/// Which attack crafts a cell's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// PGD along the mode's gradient.
    Pgd,
    /// The gradient-free Square Attack on the deployed pipeline's outputs.
    Square,
}

/// Every setting of a harness run that changes its results (echoed in reports, compared on
/// resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarnessConfig {
    /// Crafting attack.
    pub attack: AttackKind,
    /// PGD gradient steps.
    pub steps: usize,
    /// PGD step size in [0,1] pixel units; `None`: [`PgdConfig::default_step_size`].
    pub step_size: Option<f64>,
    /// Purification samples averaged per gradient (BPDA and white-box).
    pub eot: u32,
    /// Square's query budget per image.
    pub queries: usize,
    /// Fresh-noise evaluation runs per adversarial image.
    pub runs: u32,
    /// Seed of the attack's own randomness (random start, EOT noise, Square).
    pub seed: u64,
    /// Loss PGD ascends.
    pub loss: Loss,
    /// PGD starts at a random point of the ball.
    pub random_start: bool,
}

impl HarnessConfig {
    /// Refuses settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidConfig(what.to_string()));
        if self.runs == 0 {
            return bad("--runs must be at least 1");
        }
        if self.attack == AttackKind::Pgd && self.eot == 0 {
            return bad("--eot must be at least 1");
        }
        if self.attack == AttackKind::Square && self.queries == 0 {
            return bad("--queries must be at least 1");
        }
        if let Some(s) = self.step_size {
            if !(s.is_finite() && s > 0.0) {
                return bad(&format!("--step-size must be a positive number, got {s}"));
            }
        }
        Ok(())
    }

    /// The PGD settings for `threat`, seeded per batch.
    pub fn pgd(&self, threat: ThreatModel, batch_seed: u64) -> PgdConfig {
        PgdConfig {
            threat,
            steps: self.steps,
            step_size: self
                .step_size
                .unwrap_or_else(|| PgdConfig::default_step_size(threat, self.steps)),
            random_start: self.random_start,
            seed: self.seed ^ batch_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        }
    }
}

/// What happened to one image in one cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageOutcome {
    /// Index of the image in the data file.
    pub index: usize,
    /// True label.
    pub label: usize,
    /// Evaluation runs (of `runs`) that classified the adversarial image correctly.
    pub runs_correct: u32,
    /// Distance of the adversarial image from the clean one, in the threat model's norm.
    pub distance: f64,
}

/// The differentiable twins, where this build has them.
pub struct Twins<'a> {
    /// Twin of the deployed classifier.
    pub classifier: Option<&'a mut dyn DifferentiableClassifier>,
    /// Twin of the deployed denoiser.
    pub denoiser: Option<&'a mut dyn DifferentiableDenoiser>,
}

fn needs_twin(mode: AttackMode, what: &str) -> Error {
    Error::AttackUnavailable(format!(
        "mode {mode} needs the differentiable twin of the {what}; this build has none (build \
         with the default `twin` feature)"
    ))
}

/// Crafts and evaluates one cell on one batch: `images` are data items `first..first + n`.
#[allow(clippy::too_many_arguments)]
pub fn run_cell(
    pipeline: &mut Pipeline,
    twins: &mut Twins,
    cfg: &HarnessConfig,
    threat: ThreatModel,
    mode: AttackMode,
    images: ArrayView4<f32>,
    labels: &[usize],
    first: usize,
    cell_tag: u64,
) -> Result<Vec<ImageOutcome>> {
    let n = labels.len();
    let frames = ATTACK_FRAME_BASE + (cell_tag << 32) + first as u64;
    let adversarial: Array4<f32> = match cfg.attack {
        AttackKind::Square => {
            let defended = mode.evaluates_defended();
            let square = SquareConfig {
                threat,
                queries: cfg.queries,
                p_init: if threat.norm == Norm::Linf { 0.05 } else { 0.1 },
                seed: cfg.seed ^ first as u64,
                // A stochastic defence: one misclassified query is not yet a broken image.
                early_stop: !defended,
            };
            let mut model = |x: ArrayView4<f32>, q: u64| -> Result<Array2<f32>> {
                let at = frames + (q + 1) * (n as u64);
                let d = if defended {
                    pipeline.decide(x, at)?
                } else {
                    pipeline.decide_undefended(x, at)?
                };
                let classes = d.first().map_or(0, |d| d.probs.len());
                let rows: Vec<f32> = d.iter().flat_map(|d| d.probs.iter().copied()).collect();
                Array2::from_shape_vec((d.len(), classes), rows)
                    .map_err(|e| Error::Backend(e.to_string()))
            };
            square_attack(&mut model, images, labels, &square)?.adversarial
        }
        AttackKind::Pgd => {
            let pgd_cfg = cfg.pgd(threat, first as u64 ^ (cell_tag << 20));
            // Salted so that the attacker's EOT samples never reuse the evaluation's noise streams.
            let eot = EotNoise { seed: cfg.seed ^ EOT_SALT, eot: cfg.eot, first_frame: frames };
            let classifier =
                twins.classifier.as_deref_mut().ok_or_else(|| needs_twin(mode, "classifier"))?;
            match mode {
                AttackMode::Undefended | AttackMode::GreyBox => {
                    let mut g = ClassifierGradient { classifier, loss: cfg.loss };
                    pgd(&mut g, images, labels, &pgd_cfg)?
                }
                AttackMode::Bpda => {
                    let plan = pipeline.plan().clone();
                    let mut g = BpdaGradient {
                        plan: &plan,
                        denoiser: pipeline.denoiser_mut(),
                        classifier,
                        noise: eot,
                        loss: cfg.loss,
                    };
                    pgd(&mut g, images, labels, &pgd_cfg)?
                }
                AttackMode::WhiteBox => {
                    let denoiser = twins
                        .denoiser
                        .as_deref_mut()
                        .ok_or_else(|| needs_twin(mode, "denoiser"))?;
                    let plan = pipeline.plan().clone();
                    let mut g = WhiteBoxGradient {
                        plan: &plan,
                        denoiser,
                        classifier,
                        noise: eot,
                        loss: cfg.loss,
                        replay_error: 0.0,
                    };
                    pgd(&mut g, images, labels, &pgd_cfg)?
                }
            }
        }
    };
    let what = if mode.evaluates_defended() { Evaluated::Defended } else { Evaluated::Undefended };
    let tag = (cell_tag << 24) + 1 + first as u64;
    let correct = correct_runs(pipeline, what, adversarial.view(), labels, cfg.runs, tag)?;
    let dist = distances(adversarial.view(), images, threat.norm);
    Ok((0..n)
        .map(|i| ImageOutcome {
            index: first + i,
            label: labels[i],
            runs_correct: correct[i],
            distance: dist[i],
        })
        .collect())
}
