//! The attack harness: one cell = (threat model, mode) on one batch of images. Each of the
//! configured attacks crafts adversarial images against a [`Target`] (the mode's gradient, or
//! the evaluated model's scores), each result is evaluated on the deployed pipeline with fresh
//! noise `runs` times, and per image the worst attack counts. [`super::suite`] drives the cells
//! and batches, saving after every batch.

use super::apgd::Apgd;
use super::eval::{evaluate_runs, EvalNoise, Evaluated};
use super::gradients::{AttackMode, BpdaGradient, ClassifierGradient, EotNoise, WhiteBoxGradient};
use super::pgd::{distances, LossGradient, Pgd, PgdConfig};
use super::square::Square;
use super::{Attack, AttackKind, Scored, ThreatModel};
use crate::error::{Error, Result};
use crate::grad::{DifferentiableClassifier, DifferentiableDenoiser, Loss};
use crate::noise::NoiseDomain;
use crate::pipeline::Pipeline;
use ndarray::{Array2, Array4, ArrayView4};
use serde::{Deserialize, Serialize};

/// Most fresh-noise evaluation runs per image.
pub const MAX_RUNS: u32 = 1000;
/// Most EOT samples per gradient (each is a purification of every image of the batch).
pub const MAX_EOT: u32 = 1024;
/// Most PGD steps.
pub const MAX_STEPS: usize = 100_000;
/// Most Square queries per image.
pub const MAX_QUERIES: usize = 1_000_000;
/// Most attacks in one suite.
pub const MAX_ATTACKS: usize = 16;

/// One attack of a suite, with only the settings that apply to it (`None` elsewhere, and left
/// out of the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSpec {
    /// Which attack.
    pub kind: AttackKind,
    /// Gradient steps (PGD, APGD, aa-rand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// PGD step size in \[0,1\] pixel units; `None` for PGD: [`PgdConfig::default_step_size`]
    /// (the size used is in each cell's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_size: Option<f64>,
    /// Loss ascended (PGD, APGD; aa-rand runs both CE and DLR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Loss>,
    /// Query budget per image (Square).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries: Option<usize>,
    /// PGD starts at a random point of the ball.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_start: Option<bool>,
}

impl AttackSpec {
    /// PGD with `steps` steps of `step_size` (`None`: the customary size for the threat).
    pub fn pgd(steps: usize, step_size: Option<f64>, loss: Loss, random_start: bool) -> Self {
        Self {
            kind: AttackKind::Pgd,
            steps: Some(steps),
            step_size,
            loss: Some(loss),
            queries: None,
            random_start: Some(random_start),
        }
    }

    /// APGD with `steps` iterations on `loss`.
    pub fn apgd(steps: usize, loss: Loss) -> Self {
        Self {
            kind: AttackKind::Apgd,
            steps: Some(steps),
            step_size: None,
            loss: Some(loss),
            queries: None,
            random_start: None,
        }
    }

    /// AutoAttack's rand suite: APGD-CE and APGD-DLR with `steps` iterations each.
    pub fn aa_rand(steps: usize) -> Self {
        Self { kind: AttackKind::AaRand, loss: None, ..Self::apgd(steps, Loss::CrossEntropy) }
    }

    /// Square Attack with `queries` queries per image.
    pub fn square(queries: usize) -> Self {
        Self {
            kind: AttackKind::Square,
            steps: None,
            step_size: None,
            loss: None,
            queries: Some(queries),
            random_start: None,
        }
    }

    /// The attack of `kind` with the settings given (those that do not apply are ignored), the
    /// way the CLI builds it from its options.
    pub fn of_kind(
        kind: AttackKind,
        steps: usize,
        step_size: Option<f64>,
        loss: Loss,
        queries: usize,
        random_start: bool,
    ) -> Self {
        match kind {
            AttackKind::Pgd => Self::pgd(steps, step_size, loss, random_start),
            AttackKind::Apgd => Self::apgd(steps, loss),
            AttackKind::AaRand => Self::aa_rand(steps),
            AttackKind::Square => Self::square(queries),
        }
    }

    /// Whether it follows a gradient (and so uses EOT and the twins).
    pub fn uses_gradient(&self) -> bool {
        self.kind != AttackKind::Square
    }

    /// Its gradient steps; 0 for a gradient-free attack.
    pub fn gradient_steps(&self) -> usize {
        if self.uses_gradient() {
            self.steps.unwrap_or(0)
        } else {
            0
        }
    }

    fn validate(&self) -> Result<()> {
        let out_of = |what: &str, v: u64, min: u64, max: u64| {
            Err(Error::InvalidConfig(format!(
                "{what} of {} must be in {min}..={max}, got {v}",
                self.kind
            )))
        };
        if self.uses_gradient() {
            let steps = self.steps.unwrap_or(0);
            let min = usize::from(self.kind != AttackKind::Pgd);
            if steps < min || steps > MAX_STEPS {
                return out_of("--pgd-steps", steps as u64, min as u64, MAX_STEPS as u64);
            }
        } else {
            let q = self.queries.unwrap_or(0);
            if q == 0 || q > MAX_QUERIES {
                return out_of("--queries", q as u64, 1, MAX_QUERIES as u64);
            }
        }
        if let Some(s) = self.step_size {
            // Pixels are in [0, 1]: a larger step only jumps from one clip to the other.
            if !(s.is_finite() && s > 0.0 && s <= 1.0) {
                return Err(Error::InvalidConfig(format!(
                    "--step-size must be in (0, 1] pixel units, got {s}"
                )));
            }
        }
        Ok(())
    }

    /// The attacks it crafts with, each with the settings it uses at `threat` (the step size
    /// resolved): one, or for `aa-rand` APGD-CE and APGD-DLR.
    pub fn crafting(&self, threat: ThreatModel, eot: u32) -> Vec<(AttackUsed, Box<dyn Attack>)> {
        let steps = self.steps.unwrap_or(0);
        let used = |name: String, loss: Option<Loss>| AttackUsed {
            name,
            spec: AttackSpec { loss, step_size: None, ..self.clone() },
            eot: self.uses_gradient().then_some(eot),
        };
        let apgd = |loss: Loss| -> (AttackUsed, Box<dyn Attack>) {
            (
                used(format!("apgd-{}-{steps}", loss_name(loss)), Some(loss)),
                Box::new(Apgd { steps, loss }),
            )
        };
        match self.kind {
            AttackKind::AaRand => vec![apgd(Loss::CrossEntropy), apgd(Loss::Dlr)],
            AttackKind::Apgd => vec![apgd(self.loss.unwrap_or(Loss::CrossEntropy))],
            AttackKind::Pgd => {
                let loss = self.loss.unwrap_or(Loss::CrossEntropy);
                let step_size =
                    self.step_size.unwrap_or_else(|| PgdConfig::default_step_size(threat, steps));
                let random_start = self.random_start.unwrap_or(true);
                let name = match loss {
                    Loss::CrossEntropy => format!("pgd-{steps}"),
                    l => format!("pgd-{}-{steps}", loss_name(l)),
                };
                let mut u = used(name, Some(loss));
                u.spec.step_size = Some(step_size);
                vec![(u, Box::new(Pgd { steps, step_size, random_start }))]
            }
            AttackKind::Square => {
                let queries = self.queries.unwrap_or(1);
                vec![(used(format!("square-{queries}"), None), Box::new(Square { queries }))]
            }
        }
    }

    /// The attack in words, with only the settings that apply to it: `pgd, 20 steps of eps/4
    /// (Linf) or 2.5 eps/steps (L2), loss ce, random start`, `square, 100 queries`, `aa-rand
    /// (APGD-CE + APGD-DLR), 100 steps`.
    pub fn describe(&self) -> String {
        let steps = self.steps.unwrap_or(0);
        let loss = loss_name(self.loss.unwrap_or(Loss::CrossEntropy));
        match self.kind {
            AttackKind::Pgd => {
                let step = self.step_size.map_or_else(
                    || match steps {
                        1 => "eps".to_string(),
                        _ => "eps/4 (Linf) or 2.5 eps/steps (L2)".to_string(),
                    },
                    |s| format!("{s:.6} ({:.2}/255)", s * 255.0),
                );
                let steps = match steps {
                    1 => "1 step".to_string(),
                    n => format!("{n} steps"),
                };
                format!(
                    "pgd, {steps} of {step}, loss {loss}{}",
                    if self.random_start.unwrap_or(true) { ", random start" } else { "" }
                )
            }
            AttackKind::Apgd => format!("apgd, {steps} steps, loss {loss}"),
            AttackKind::AaRand => format!("aa-rand (APGD-CE + APGD-DLR), {steps} steps"),
            AttackKind::Square => format!("square, {} queries", self.queries.unwrap_or(0)),
        }
    }
}

/// The name of a loss in reports and attack names (`ce`, `margin`, `dlr`).
pub fn loss_name(loss: Loss) -> &'static str {
    match loss {
        Loss::CrossEntropy => "ce",
        Loss::Margin => "margin",
        Loss::Dlr => "dlr",
    }
}

/// One crafting attack as it ran in a cell: its name (`apgd-ce-100`, `pgd-200`, `square-1000`)
/// and the settings that applied, the step size as used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackUsed {
    /// Name in reports: kind, loss where it is not CE, steps or queries.
    pub name: String,
    /// Its settings; `step_size` is the size used (PGD; APGD adapts its own from 2 eps).
    #[serde(flatten)]
    pub spec: AttackSpec,
    /// Purifications averaged per gradient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eot: Option<u32>,
}

/// Every setting of a harness run that changes its results (echoed in reports, compared on
/// resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarnessConfig {
    /// The attacks; per image the worst counts.
    pub attacks: Vec<AttackSpec>,
    /// Purification samples averaged per gradient (BPDA and white-box; the known-noise mode
    /// uses the evaluation's own votes instead).
    pub eot: u32,
    /// Fresh-noise evaluation runs per adversarial image.
    pub runs: u32,
    /// Seed of the attacks' own randomness (random starts, EOT noise, Square).
    pub seed: u64,
}

impl HarnessConfig {
    /// Refuses settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let out_of = |what: &str, v: u64, max: u64| {
            Err(Error::InvalidConfig(format!("{what} must be in 1..={max}, got {v}")))
        };
        if self.runs == 0 || self.runs > MAX_RUNS {
            return out_of("--runs", u64::from(self.runs), u64::from(MAX_RUNS));
        }
        if self.attacks.is_empty() || self.attacks.len() > MAX_ATTACKS {
            return out_of("the number of attacks", self.attacks.len() as u64, MAX_ATTACKS as u64);
        }
        if self.uses_gradient() && (self.eot == 0 || self.eot > MAX_EOT) {
            return out_of("--eot", u64::from(self.eot), u64::from(MAX_EOT));
        }
        self.attacks.iter().try_for_each(AttackSpec::validate)
    }

    /// Whether any attack follows a gradient.
    pub fn uses_gradient(&self) -> bool {
        self.attacks.iter().any(AttackSpec::uses_gradient)
    }

    /// The attacks in words, e.g. `aa-rand (APGD-CE + APGD-DLR), 100 steps; pgd, 200 steps of
    /// 0.007000 (1.79/255), loss ce, random start; EOT 20`.
    pub fn describe(&self) -> String {
        let mut s: Vec<String> = self.attacks.iter().map(AttackSpec::describe).collect();
        if self.uses_gradient() {
            s.push(format!("EOT {}", self.eot));
        }
        s.join("; ")
    }

    /// The crafting attacks at `threat`, in order (`aa-rand` gives two).
    pub fn crafting(&self, threat: ThreatModel) -> Vec<(AttackUsed, Box<dyn Attack>)> {
        self.attacks.iter().flat_map(|a| a.crafting(threat, self.eot)).collect()
    }
}

/// What one crafting attack did to one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackOutcome {
    /// Evaluation runs (of `runs`) that classified its adversarial image correctly.
    pub runs_correct: u32,
    /// The label its adversarial image got most often over the runs (`None`: abstained).
    pub predicted: Option<usize>,
    /// Distance of its adversarial image from the clean one, in the threat model's norm.
    pub distance: f64,
}

/// What happened to one image in one cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageOutcome {
    /// Index of the image in the data file.
    pub index: usize,
    /// True label.
    pub label: usize,
    /// The label the clean image got most often over the clean runs of the model this cell
    /// evaluates (set by the suite; `None`: abstained or not measured).
    #[serde(default)]
    pub clean_pred: Option<usize>,
    /// Evaluation runs (of `runs`) that classified the adversarial image correctly, for the
    /// attack that did best on this image.
    pub runs_correct: u32,
    /// Distance of that attack's adversarial image from the clean one.
    pub distance: f64,
    /// Per crafting attack of the cell, in the cell's order.
    #[serde(default)]
    pub by_attack: Vec<AttackOutcome>,
}

/// Model passes an attack spent crafting (the final evaluation not included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// Purifications (each the DDIM plan's denoiser calls on one image).
    pub purifications: u64,
    /// Denoiser forward passes on one image (purifications x DDIM steps).
    pub denoiser_passes: u64,
    /// Classifier forward passes on one image.
    pub classifier_passes: u64,
}

impl Cost {
    /// Adds `other`.
    pub fn add(&mut self, other: Cost) {
        self.purifications += other.purifications;
        self.denoiser_passes += other.denoiser_passes;
        self.classifier_passes += other.classifier_passes;
    }

    /// Forward passes of either network, the `number_forward_passes` of robustness reports.
    pub fn forward_passes(&self) -> u64 {
        self.denoiser_passes + self.classifier_passes
    }
}

/// A cell's outcome on one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct CellOutcome {
    /// Per image, in batch order.
    pub images: Vec<ImageOutcome>,
    /// The crafting attacks as they ran, with what each cost on the batch.
    pub attacks: Vec<(AttackUsed, Cost)>,
}

/// The differentiable twins, where this build has them.
pub struct Twins<'a> {
    /// Twin of the defended pipeline's classifier.
    pub classifier: Option<&'a mut dyn DifferentiableClassifier>,
    /// Twin of the undefended mode's classifier where it is another file (a manifest's
    /// `[defended_classifier]`); `None`: `classifier`.
    pub bare_classifier: Option<&'a mut dyn DifferentiableClassifier>,
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
/// noise streams of the cell's own domains. It counts what the attack spends.
pub struct Target<'p, 't> {
    pipeline: &'p mut Pipeline,
    twins: &'p mut Twins<'t>,
    mode: AttackMode,
    cell: u32,
    attack: u32,
    first: usize,
    loss: Loss,
    eot: u32,
    seed: u64,
    cost: Cost,
}

impl Target<'_, '_> {
    /// The attack mode (which gradient, what is evaluated).
    pub fn mode(&self) -> AttackMode {
        self.mode
    }

    /// The attack's own seed (random starts, EOT noise, random search), distinct for every
    /// attack of a cell.
    pub fn seed(&self) -> u64 {
        self.seed ^ u64::from(self.attack).wrapping_mul(0xd6e8_feb8_6659_fd93)
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
    /// samples drawn from [`NoiseDomain::AttackEot`] of this cell and attack; in the known-noise
    /// mode the exact one through the very purifications the evaluation will use.
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
        let known = mode == AttackMode::KnownNoise;
        let eot = EotNoise {
            seed: if known { self.pipeline.seed() } else { self.seed },
            eot: if known { self.pipeline.votes() } else { self.eot },
            first_frame: self.first as u64,
            cell: self.cell,
            attack: self.attack,
            known,
        };
        let steps = self.pipeline.plan().steps().len() as u64;
        let bare = match (mode, self.twins.bare_classifier.as_deref_mut()) {
            (AttackMode::Undefended, Some(b)) => Some(b),
            _ => None,
        };
        let classifier = match bare {
            Some(b) => b,
            None => self
                .twins
                .classifier
                .as_deref_mut()
                .ok_or_else(|| needs_twin(mode, "classifier"))?,
        };
        let cost = &mut self.cost;
        match mode {
            AttackMode::Undefended | AttackMode::GreyBox => {
                let mut g = ClassifierGradient { classifier, loss };
                f(&mut Counted { inner: &mut g, cost, samples: 1, steps: 0 })
            }
            AttackMode::Bpda => {
                let plan = self.pipeline.plan().clone();
                let denoiser = self.pipeline.denoiser_mut();
                let mut g = BpdaGradient { plan: &plan, denoiser, classifier, noise: eot, loss };
                f(&mut Counted { inner: &mut g, cost, samples: eot.eot, steps })
            }
            AttackMode::WhiteBox | AttackMode::KnownNoise => {
                let denoiser = self
                    .twins
                    .denoiser
                    .as_deref_mut()
                    .ok_or_else(|| needs_twin(mode, "denoiser"))?;
                let plan = self.pipeline.plan().clone();
                let mut g = WhiteBoxGradient {
                    plan: &plan,
                    denoiser,
                    classifier,
                    noise: eot,
                    loss,
                    replay_error: 0.0,
                };
                f(&mut Counted { inner: &mut g, cost, samples: eot.eot, steps })
            }
        }
    }
}

/// A gradient that counts the passes behind each call: `samples` purifications of `steps`
/// denoiser calls (0: no purifier) and one classifier pass per sample.
struct Counted<'g> {
    inner: &'g mut dyn LossGradient,
    cost: &'g mut Cost,
    samples: u32,
    steps: u64,
}

impl Counted<'_> {
    fn count(&mut self, images: usize) {
        let n = images as u64 * u64::from(self.samples);
        let purified = if self.steps > 0 { n } else { 0 };
        self.cost.add(Cost {
            purifications: purified,
            denoiser_passes: purified * self.steps,
            classifier_passes: n,
        });
    }
}

impl LossGradient for Counted<'_> {
    fn loss_grad(&mut self, x: ArrayView4<f32>, labels: &[usize], k: usize) -> Result<Array4<f32>> {
        self.count(x.shape()[0]);
        self.inner.loss_grad(x, labels, k)
    }

    fn loss_values_and_grad(
        &mut self,
        x: ArrayView4<f32>,
        labels: &[usize],
        k: usize,
    ) -> Result<(Vec<f32>, Array4<f32>)> {
        self.count(x.shape()[0]);
        self.inner.loss_values_and_grad(x, labels, k)
    }
}

impl Scored for Target<'_, '_> {
    /// Mean probabilities of the model the mode evaluates: the defended pipeline, query `query`
    /// drawing from [`NoiseDomain::AttackQuery`], or the bare classifier.
    fn scores(&mut self, x: ArrayView4<f32>, query: u64) -> Result<Array2<f32>> {
        let query = u32::try_from(query)
            .ok()
            .and_then(|q| q.checked_add(self.attack.checked_mul(1 << 24)?))
            .ok_or_else(|| {
                Error::InvalidConfig(format!("query {query} beyond the noise domains"))
            })?;
        let domain = NoiseDomain::AttackQuery { cell: self.cell, query };
        let n = x.shape()[0] as u64;
        let d = if self.mode.evaluates_defended() {
            let votes = u64::from(self.pipeline.votes());
            let steps = self.pipeline.plan().steps().len() as u64;
            self.cost.add(Cost {
                purifications: n * votes,
                denoiser_passes: n * votes * steps,
                classifier_passes: n * votes,
            });
            self.pipeline.decide_in(x, domain, self.first as u64)?
        } else {
            self.cost.add(Cost { classifier_passes: n, ..Cost::default() });
            self.pipeline.decide_undefended(x, self.first as u64)?
        };
        let classes = d.first().map_or(0, |d| d.probs.len());
        let rows: Vec<f32> = d.iter().flat_map(|d| d.probs.iter().copied()).collect();
        Array2::from_shape_vec((d.len(), classes), rows).map_err(|e| Error::Backend(e.to_string()))
    }
}

/// Crafts and evaluates one cell on one batch: `images` are data items `first..first + n`;
/// `cell` (from 1) numbers the (threat model, mode) cell and keys its noise domains. Per image
/// the attack that left the fewest correct runs counts.
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
) -> Result<CellOutcome> {
    let n = labels.len();
    let what = if mode.evaluates_defended() { Evaluated::Defended } else { Evaluated::Undefended };
    let noise = if mode == AttackMode::KnownNoise {
        EvalNoise::Known { cell }
    } else {
        EvalNoise::Fresh { cell }
    };
    let mut out: Vec<ImageOutcome> = (0..n)
        .map(|i| ImageOutcome {
            index: first + i,
            label: labels[i],
            clean_pred: None,
            runs_correct: u32::MAX,
            distance: 0.0,
            by_attack: Vec::new(),
        })
        .collect();
    let mut attacks = Vec::new();
    for (k, (used, attack)) in cfg.crafting(threat).into_iter().enumerate() {
        let mut target = Target {
            pipeline: &mut *pipeline,
            twins: &mut *twins,
            mode,
            cell,
            attack: u32::try_from(k)
                .map_err(|_| Error::InvalidConfig("too many attacks".into()))?,
            first,
            loss: used.spec.loss.unwrap_or(Loss::CrossEntropy),
            eot: cfg.eot,
            seed: cfg.seed,
            cost: Cost::default(),
        };
        let adversarial = attack.craft(&mut target, images, labels, threat)?;
        let cost = target.cost;
        let tallies =
            evaluate_runs(pipeline, what, adversarial.view(), labels, cfg.runs, noise, first)?;
        let d = distances(adversarial.view(), images, threat.norm);
        for (i, o) in out.iter_mut().enumerate() {
            let t = &tallies[i];
            if t.correct < o.runs_correct {
                (o.runs_correct, o.distance) = (t.correct, d[i]);
            }
            o.by_attack.push(AttackOutcome {
                runs_correct: t.correct,
                predicted: t.predicted,
                distance: d[i],
            });
        }
        attacks.push((used, cost));
    }
    Ok(CellOutcome { images: out, attacks })
}
