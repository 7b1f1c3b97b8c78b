//! The attack harness: one cell = (threat model, mode) on one batch of images. The configured
//! [`Attack`] crafts the adversarial images against a [`Target`] (the mode's gradient, or the
//! evaluated model's scores), then they are evaluated on the deployed pipeline with fresh noise,
//! `runs` times. [`super::suite`] drives the cells and batches, saving after every batch.

use super::apgd::Apgd;
use super::eval::{correct_runs, Evaluated};
use super::gradients::{AttackMode, BpdaGradient, ClassifierGradient, EotNoise, WhiteBoxGradient};
use super::pgd::{distances, LossGradient, Pgd};
use super::square::Square;
use super::{Attack, AttackKind, Scored, ThreatModel};
use crate::error::{Error, Result};
use crate::grad::{DifferentiableClassifier, DifferentiableDenoiser, Loss};
use crate::noise::NoiseDomain;
use crate::pipeline::Pipeline;
use ndarray::{Array2, ArrayView4};
use serde::{Deserialize, Serialize};

/// Most fresh-noise evaluation runs per image.
pub const MAX_RUNS: u32 = 1000;
/// Most EOT samples per gradient (each is a purification of every image of the batch).
pub const MAX_EOT: u32 = 1024;
/// Most PGD steps.
pub const MAX_STEPS: usize = 100_000;
/// Most Square queries per image.
pub const MAX_QUERIES: usize = 1_000_000;

/// Every setting of a harness run that changes its results (echoed in reports, compared on
/// resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarnessConfig {
    /// Crafting attack.
    pub attack: AttackKind,
    /// PGD gradient steps.
    pub steps: usize,
    /// PGD step size in \[0,1\] pixel units; `None`: [`super::pgd::PgdConfig::default_step_size`].
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
        let out_of = |what: &str, v: u64, max: u64| {
            Err(Error::InvalidConfig(format!("{what} must be in 1..={max}, got {v}")))
        };
        if self.runs == 0 || self.runs > MAX_RUNS {
            return out_of("--runs", u64::from(self.runs), u64::from(MAX_RUNS));
        }
        let gradient =
            matches!(self.attack, AttackKind::Pgd | AttackKind::Apgd | AttackKind::AaRand);
        if gradient && (self.eot == 0 || self.eot > MAX_EOT) {
            return out_of("--eot", u64::from(self.eot), u64::from(MAX_EOT));
        }
        if matches!(self.attack, AttackKind::Apgd | AttackKind::AaRand) && self.steps == 0 {
            return out_of("--steps", 0, MAX_STEPS as u64);
        }
        if gradient && self.steps > MAX_STEPS {
            return out_of("--steps", self.steps as u64, MAX_STEPS as u64);
        }
        if self.attack == AttackKind::Square && (self.queries == 0 || self.queries > MAX_QUERIES) {
            return out_of("--queries", self.queries as u64, MAX_QUERIES as u64);
        }
        if let Some(s) = self.step_size {
            if !(s.is_finite() && s > 0.0) {
                return bad(&format!("--step-size must be a positive number, got {s}"));
            }
        }
        Ok(())
    }

    /// The attack in words, with only the settings that apply to it: `pgd, 20 steps of eps/4,
    /// EOT 8, loss ce, random start`, `square, 100 queries`, `aa-rand (APGD-CE + APGD-DLR), 100
    /// steps, EOT 20`.
    pub fn describe(&self) -> String {
        let loss = match self.loss {
            Loss::CrossEntropy => "ce",
            Loss::Margin => "margin",
            Loss::Dlr => "dlr",
        };
        let step = self.step_size.map_or_else(
            || "eps/4 (Linf) or 2.5 eps/steps (L2)".to_string(),
            |s| format!("{:.6} ({:.2}/255)", s, s * 255.0),
        );
        match self.attack {
            AttackKind::Pgd => format!(
                "pgd, {} steps of {step}, EOT {}, loss {loss}{}",
                self.steps,
                self.eot,
                if self.random_start { ", random start" } else { "" }
            ),
            AttackKind::Apgd => {
                format!("apgd, {} steps, EOT {}, loss {loss}", self.steps, self.eot)
            }
            AttackKind::AaRand => {
                format!("aa-rand (APGD-CE + APGD-DLR), {} steps, EOT {}", self.steps, self.eot)
            }
            AttackKind::Square => format!("square, {} queries", self.queries),
        }
    }

    /// The configured attacks for `threat`: one, or for `aa-rand` APGD-CE and APGD-DLR, whose
    /// results count per image at their worst.
    pub fn attacks_for(&self, threat: ThreatModel) -> Vec<Box<dyn Attack>> {
        match self.attack {
            AttackKind::AaRand => vec![
                Box::new(Apgd { steps: self.steps, loss: Loss::CrossEntropy }),
                Box::new(Apgd { steps: self.steps, loss: Loss::Dlr }),
            ],
            _ => vec![self.attack_for(threat)],
        }
    }

    /// The configured attack for `threat` (`aa-rand`: its APGD-CE).
    pub fn attack_for(&self, threat: ThreatModel) -> Box<dyn Attack> {
        match self.attack {
            AttackKind::Apgd => Box::new(Apgd { steps: self.steps, loss: self.loss }),
            AttackKind::AaRand => Box::new(Apgd { steps: self.steps, loss: Loss::CrossEntropy }),
            AttackKind::Pgd => Box::new(Pgd {
                steps: self.steps,
                step_size: self.step_size.unwrap_or_else(|| {
                    super::pgd::PgdConfig::default_step_size(threat, self.steps)
                }),
                random_start: self.random_start,
            }),
            AttackKind::Square => Box::new(Square { queries: self.queries }),
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

/// What an [`Attack`] may use of the deployed system in one cell: the mode's loss gradient
/// ([`Target::with_gradient`]) or the scores of the model the mode evaluates ([`Scored`]), with
/// noise streams of the cell's own domains.
pub struct Target<'p, 't> {
    pipeline: &'p mut Pipeline,
    twins: &'p mut Twins<'t>,
    mode: AttackMode,
    cell: u32,
    first: usize,
    loss: Loss,
    eot: u32,
    seed: u64,
}

impl Target<'_, '_> {
    /// The attack mode (which gradient, what is evaluated).
    pub fn mode(&self) -> AttackMode {
        self.mode
    }

    /// The attack's own seed (random starts, EOT noise, random search).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Data index of the batch's first image (keys per-image randomness).
    pub fn first(&self) -> usize {
        self.first
    }

    /// The cell's number (keys its noise domains).
    pub fn cell(&self) -> u32 {
        self.cell
    }

    /// Runs `f` with the mode's loss gradient: the bare classifier's (undefended, grey-box),
    /// BPDA's or the exact one through every DDIM step (white-box), both averaged over EOT
    /// samples drawn from [`NoiseDomain::AttackEot`] of this cell.
    pub fn with_gradient<R>(
        &mut self,
        f: impl FnOnce(&mut dyn LossGradient) -> Result<R>,
    ) -> Result<R> {
        self.with_gradient_for(self.loss, f)
    }

    /// [`Target::with_gradient`] with the attack's own loss instead of the configured one
    /// (APGD-CE and APGD-DLR of one suite).
    pub fn with_gradient_for<R>(
        &mut self,
        loss: Loss,
        f: impl FnOnce(&mut dyn LossGradient) -> Result<R>,
    ) -> Result<R> {
        let mode = self.mode;
        let eot = EotNoise {
            seed: self.seed,
            eot: self.eot,
            first_frame: self.first as u64,
            cell: self.cell,
        };
        let classifier =
            self.twins.classifier.as_deref_mut().ok_or_else(|| needs_twin(mode, "classifier"))?;
        match mode {
            AttackMode::Undefended | AttackMode::GreyBox => {
                f(&mut ClassifierGradient { classifier, loss })
            }
            AttackMode::Bpda => {
                let plan = self.pipeline.plan().clone();
                let denoiser = self.pipeline.denoiser_mut();
                f(&mut BpdaGradient { plan: &plan, denoiser, classifier, noise: eot, loss })
            }
            AttackMode::WhiteBox => {
                let denoiser = self
                    .twins
                    .denoiser
                    .as_deref_mut()
                    .ok_or_else(|| needs_twin(mode, "denoiser"))?;
                let plan = self.pipeline.plan().clone();
                f(&mut WhiteBoxGradient {
                    plan: &plan,
                    denoiser,
                    classifier,
                    noise: eot,
                    loss,
                    replay_error: 0.0,
                })
            }
        }
    }
}

impl Scored for Target<'_, '_> {
    /// Mean probabilities of the model the mode evaluates: the defended pipeline, query `query`
    /// drawing from [`NoiseDomain::AttackQuery`], or the bare classifier.
    fn scores(&mut self, x: ArrayView4<f32>, query: u64) -> Result<Array2<f32>> {
        let query = u32::try_from(query)
            .map_err(|_| Error::InvalidConfig(format!("query {query} beyond the noise domains")))?;
        let domain = NoiseDomain::AttackQuery { cell: self.cell, query };
        let d = if self.mode.evaluates_defended() {
            self.pipeline.decide_in(x, domain, self.first as u64)?
        } else {
            self.pipeline.decide_undefended(x, self.first as u64)?
        };
        let classes = d.first().map_or(0, |d| d.probs.len());
        let rows: Vec<f32> = d.iter().flat_map(|d| d.probs.iter().copied()).collect();
        Array2::from_shape_vec((d.len(), classes), rows).map_err(|e| Error::Backend(e.to_string()))
    }
}

/// Crafts and evaluates one cell on one batch: `images` are data items `first..first + n`;
/// `cell` (from 1) numbers the (threat model, mode) cell and keys its noise domains.
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
    cell: u32,
) -> Result<Vec<ImageOutcome>> {
    let n = labels.len();
    let what = if mode.evaluates_defended() { Evaluated::Defended } else { Evaluated::Undefended };
    // Per image the worst of the suite's attacks: fewest correct runs, and the distance of the
    // adversarial image that achieved it.
    let mut correct = vec![u32::MAX; n];
    let mut dist = vec![0.0f64; n];
    for attack in cfg.attacks_for(threat) {
        let mut target = Target {
            pipeline: &mut *pipeline,
            twins: &mut *twins,
            mode,
            cell,
            first,
            loss: cfg.loss,
            eot: cfg.eot,
            seed: cfg.seed,
        };
        let adversarial = attack.craft(&mut target, images, labels, threat)?;
        let c = correct_runs(pipeline, what, adversarial.view(), labels, cfg.runs, cell, first)?;
        let d = distances(adversarial.view(), images, threat.norm);
        for i in 0..n {
            if c[i] < correct[i] {
                (correct[i], dist[i]) = (c[i], d[i]);
            }
        }
    }
    Ok((0..n)
        .map(|i| ImageOutcome {
            index: first + i,
            label: labels[i],
            runs_correct: correct[i],
            distance: dist[i],
        })
        .collect())
}
