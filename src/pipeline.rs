//! frame → purifier → classifier → decision, with several purifications ("votes") per frame
//! run as one batch and combined into one decision.
//!
//! [`Pipeline`] is the engine beneath [`crate::Defense`]: it takes frames at the models' input
//! size with explicit frame indices and noise domains, which the attack harness and the tuning
//! sweep need. A camera app wants [`crate::Defense`], which numbers frames and resizes them.

use crate::backend::{Classifier, Denoiser};
use crate::budget::{plan_frame, Budget, CostModel};
use crate::config::VoteRule;
use crate::decision::{softmax_rows, Decision, DecisionRule};
use crate::error::{Error, Result};
use crate::noise::{NoiseDomain, SeededNoise, StreamId};
use crate::purify::{validate_images, Purification};
use crate::schedule::{DdimPlan, PlanSpec, Schedule};
use ndarray::{Array2, Array4, ArrayView4, Axis};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

/// Untimed warm-up runs per batch size in [`Pipeline::calibrate`].
const CALIBRATION_WARMUP: usize = 2;
/// Timed runs per batch size in [`Pipeline::calibrate`] (2 denoiser steps each).
const CALIBRATION_RUNS: usize = 3;

/// How a frame's purification ends.
struct Purified {
    images: Array4<f32>,
    steps: usize,
    anytime: bool,
}

/// The defended classifier: a DDIM plan, a denoiser and a classifier.
pub struct Pipeline {
    plan: Arc<DdimPlan>,
    schedule: Schedule,
    trained: RangeInclusive<u32>,
    /// Plans with fewer steps at the same T* and eta, built on first use by the budget planner.
    coarser: Vec<Option<Arc<DdimPlan>>>,
    denoiser: Box<dyn Denoiser>,
    classifier: Box<dyn Classifier>,
    /// The undefended mode's classifier where it is not `classifier` (a manifest's
    /// `[defended_classifier]`).
    bare_classifier: Option<Box<dyn Classifier>>,
    classes: Vec<String>,
    votes: u32,
    rule: DecisionRule,
    seed: u64,
    costs: CostModel,
}

impl Pipeline {
    /// Assembles a pipeline; `plan` must come from `schedule` and the denoiser's `trained` t
    /// range (the budget planner derives coarser plans from them); `classes` are the
    /// classifier's class names in logit order; `seed` keys every noise stream (see
    /// [`crate::noise`]). Decisions list the top 3 classes and never abstain until
    /// [`Pipeline::set_decision_rule`] says otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        schedule: Schedule,
        trained: RangeInclusive<u32>,
        plan: DdimPlan,
        denoiser: Box<dyn Denoiser>,
        classifier: Box<dyn Classifier>,
        classes: Vec<String>,
        votes: u32,
        rule: VoteRule,
        seed: u64,
    ) -> Result<Self> {
        if votes == 0 {
            return Err(Error::InvalidConfig("votes must be at least 1".into()));
        }
        let coarser = vec![None; plan.steps().len()];
        let plan = Arc::new(plan);
        Ok(Self {
            plan,
            schedule,
            trained,
            coarser,
            denoiser,
            classifier,
            bare_classifier: None,
            classes,
            votes,
            rule: DecisionRule { vote_rule: rule, ..DecisionRule::default() },
            seed,
            costs: CostModel::default(),
        })
    }

    /// Replaces how votes become decisions (vote rule, top-k, abstention threshold).
    pub fn set_decision_rule(&mut self, rule: DecisionRule) {
        self.rule = rule;
    }

    /// The seed of the noise streams.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The DDIM plan in use.
    pub fn plan(&self) -> &DdimPlan {
        &self.plan
    }

    /// Class names in logit order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Purifications per frame.
    pub fn votes(&self) -> u32 {
        self.votes
    }

    /// Measured costs of the backend so far.
    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    /// The denoiser, for attacks and diagnostics.
    pub fn denoiser_mut(&mut self) -> &mut dyn Denoiser {
        self.denoiser.as_mut()
    }

    /// The plan with `steps` steps: the configured one at full length, else an evenly spaced
    /// one at the same T* and eta (cached).
    fn plan_with_steps(&mut self, steps: usize) -> Result<Arc<DdimPlan>> {
        if steps >= self.plan.steps().len() {
            return Ok(Arc::clone(&self.plan));
        }
        let idx = steps.saturating_sub(1);
        if self.coarser[idx].is_none() {
            let p = DdimPlan::new(
                &self.schedule,
                self.trained.clone(),
                self.plan.t_star(),
                &PlanSpec::Steps(steps.max(1) as u32),
                self.plan.eta(),
            )?;
            self.coarser[idx] = Some(Arc::new(p));
        }
        Ok(Arc::clone(self.coarser[idx].as_ref().expect("built above")))
    }

    /// Purifies `frames` `votes` times each in one batch, frame-major
    /// ([frame0 vote0, frame0 vote1, ...]), with `steps` DDIM steps; with a deadline
    /// (start, seconds) it stops early once the next step and the classifier would not fit.
    fn run_purification(
        &mut self,
        frames: ArrayView4<f32>,
        ids: FrameIds,
        votes: u32,
        steps: usize,
        deadline: Option<(Instant, f64)>,
    ) -> Result<Purified> {
        let v = votes as usize;
        let items: Vec<StreamId> = (0..frames.shape()[0] as u64)
            .flat_map(|f| {
                (0..votes).map(move |vote| StreamId {
                    domain: ids.domain,
                    frame: ids.first + f,
                    vote,
                })
            })
            .collect();
        // One vote needs no copy: the purifier copies its input into its own state anyway.
        let repeated;
        let batch_view = if v == 1 {
            frames
        } else {
            let views: Vec<_> =
                frames.outer_iter().flat_map(|f| std::iter::repeat_n(f, v)).collect();
            repeated =
                ndarray::stack(Axis(0), &views).map_err(|e| Error::Backend(e.to_string()))?;
            repeated.view()
        };
        let batch = items.len();
        let mut noise = SeededNoise::new(self.seed, items);
        // A shared handle, so holding the plan does not borrow self (denoiser, cost model).
        let plan = self.plan_with_steps(steps)?;
        let mut run = Purification::start(&plan, batch_view, &mut noise)?;
        let mut anytime = false;
        loop {
            let t = Instant::now();
            if run.step(self.denoiser.as_mut(), &mut noise)?.is_none() {
                break;
            }
            self.costs.record_denoise(batch, t.elapsed().as_secs_f64());
            if let (Some((start, seconds)), false) = (deadline, run.is_complete()) {
                let next = self.costs.frame_s(1, votes).unwrap_or(0.0);
                if start.elapsed().as_secs_f64() + next > seconds {
                    anytime = true;
                    break;
                }
            }
        }
        let images = run
            .current_image()
            .ok_or_else(|| Error::Backend("purification ended before its first step".into()))?;
        Ok(Purified { images, steps: run.steps_done(), anytime })
    }

    /// Purifies `frames` (\[0,1\] pixels, NCHW), `votes` times each, all in one batch; frame i has
    /// index `first_frame + i`. Returns the purified images ordered frame-major
    /// ([frame0 vote0, frame0 vote1, ...]).
    pub fn purify_votes(
        &mut self,
        frames: ArrayView4<f32>,
        first_frame: u64,
    ) -> Result<Array4<f32>> {
        let steps = self.plan.steps().len();
        let ids = FrameIds::frames(first_frame);
        Ok(self.run_purification(frames, ids, self.votes, steps, None)?.images)
    }

    /// Like [`Pipeline::purify_votes`] with the noise streams of `domain`: frame i is frame
    /// `first_frame + i` of that domain.
    pub fn purify_votes_in(
        &mut self,
        frames: ArrayView4<f32>,
        domain: NoiseDomain,
        first_frame: u64,
    ) -> Result<Array4<f32>> {
        let steps = self.plan.steps().len();
        let ids = FrameIds { domain, first: first_frame };
        Ok(self.run_purification(frames, ids, self.votes, steps, None)?.images)
    }

    /// Classifies `frames` (\[0,1\] pixels, NCHW at the models' input size) through the defence;
    /// frame i is deployed frame `first_frame + i` ([`NoiseDomain::Frames`]).
    pub fn decide(&mut self, frames: ArrayView4<f32>, first_frame: u64) -> Result<Vec<Decision>> {
        self.decide_in(frames, NoiseDomain::Frames, first_frame)
    }

    /// Like [`Pipeline::decide`] with the noise streams of `domain` (attack queries and
    /// evaluation runs, warm-up frames): frame i is frame `first_frame + i` of that domain.
    pub fn decide_in(
        &mut self,
        frames: ArrayView4<f32>,
        domain: NoiseDomain,
        first_frame: u64,
    ) -> Result<Vec<Decision>> {
        let steps = self.plan.steps().len();
        let ids = FrameIds { domain, first: first_frame };
        self.decide_with(frames, ids, self.votes, steps, None)
    }

    /// Classifies one frame (`frame` is [1, C, H, W]) within `budget`: plans steps and votes
    /// from the measured costs, and if time runs out mid-way classifies the latest x0 estimate.
    /// When even the smallest plan is predicted not to fit, it runs that plan anyway and the
    /// decision says the deadline was missed.
    pub fn decide_within(
        &mut self,
        frame: ArrayView4<f32>,
        index: u64,
        budget: &Budget,
    ) -> Result<Decision> {
        if frame.shape()[0] != 1 {
            return Err(Error::Shape {
                expected: "one frame [1, C, H, W] under a latency budget".into(),
                got: format!("{:?}", frame.shape()),
            });
        }
        let l = &budget.limits;
        let (steps, votes) = match plan_frame(&self.costs, budget.seconds, l) {
            Some(p) => (p.steps, p.votes),
            None => (l.min_steps.max(1), l.min_votes.max(1)),
        };
        let start = Instant::now();
        let deadline = Some((start, budget.seconds));
        let mut d = self.decide_with(frame, FrameIds::frames(index), votes, steps, deadline)?;
        let mut d = d.pop().ok_or_else(|| Error::Backend("no decision for the frame".into()))?;
        d.deadline_met = Some(start.elapsed().as_secs_f64() <= budget.seconds);
        Ok(d)
    }

    /// Runs the smallest and largest vote count a few times untimed (tract builds its plan for
    /// a batch size on first use) and then timed, so the planner has costs before the first
    /// real frame. Returns an error naming the numbers when even one step cannot fit.
    pub fn calibrate(&mut self, budget: &Budget, shape: [usize; 3]) -> Result<()> {
        let probe = Array4::from_elem((1, shape[0], shape[1], shape[2]), 0.5f32);
        let l = budget.limits;
        for votes in [l.min_votes.max(1), l.max_votes.max(1)] {
            // The first runs at a batch size build tract's plan and fault in its buffers; they
            // are several times slower than the steady state and would skew the estimate.
            let saved = std::mem::take(&mut self.costs);
            let probes = |k: usize| FrameIds { domain: NoiseDomain::Calibration, first: k as u64 };
            for k in 0..CALIBRATION_WARMUP {
                self.decide_with(probe.view(), probes(k), votes, 2, None)?;
            }
            self.costs = saved;
            for k in 0..CALIBRATION_RUNS {
                self.decide_with(probe.view(), probes(CALIBRATION_WARMUP + k), votes, 2, None)?;
            }
        }
        if plan_frame(&self.costs, budget.seconds, &l).is_none() {
            let v = l.min_votes.max(1);
            // To the microsecond: one decimal showed a 0.001 ms budget as "0.0 ms".
            let budget_ms = (budget.seconds * 1e6).round() / 1e3;
            return Err(Error::InvalidConfig(format!(
                "a budget of {budget_ms} ms cannot fit even {} DDIM step(s) with {v} vote(s): one \
                 step takes about {:.1} ms and the classifier {:.1} ms on this backend",
                l.min_steps.max(1),
                self.costs.denoise_s(v as usize).unwrap_or(f64::NAN) * 1e3,
                self.costs.classify_s(v as usize).unwrap_or(f64::NAN) * 1e3,
            )));
        }
        Ok(())
    }

    fn decide_with(
        &mut self,
        frames: ArrayView4<f32>,
        ids: FrameIds,
        votes: u32,
        steps: usize,
        deadline: Option<(Instant, f64)>,
    ) -> Result<Vec<Decision>> {
        let n = frames.shape()[0];
        if n == 0 {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let purified = self.run_purification(frames, ids, votes, steps, deadline)?;
        let t1 = Instant::now();
        let logits = self.classifier.logits(purified.images.view())?;
        let t2 = Instant::now();
        self.costs.record_classify(purified.images.shape()[0], (t2 - t1).as_secs_f64());
        let share = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n as f64;
        let mut out =
            self.combine(&logits, votes as usize, ids.first, share(t1 - t0), share(t2 - t1))?;
        for d in &mut out {
            d.planned_steps = steps;
            d.steps = purified.steps;
            d.anytime = purified.anytime;
        }
        Ok(out)
    }

    /// Makes `classifier` the undefended mode's ([`Pipeline::decide_undefended`]); the one
    /// given to [`Pipeline::new`] stays the defended pipeline's.
    pub fn set_bare_classifier(&mut self, classifier: Box<dyn Classifier>) {
        self.bare_classifier = Some(classifier);
    }

    /// Classifies `frames` with the bare classifier (no purification): the manifest's
    /// `[classifier]`, also where the defended pipeline runs a `[defended_classifier]`.
    pub fn decide_undefended(
        &mut self,
        frames: ArrayView4<f32>,
        first_frame: u64,
    ) -> Result<Vec<Decision>> {
        let n = frames.shape()[0];
        if n == 0 {
            return Ok(Vec::new());
        }
        validate_images(frames, "classifier input")?;
        let t0 = Instant::now();
        let logits =
            self.bare_classifier.as_mut().unwrap_or(&mut self.classifier).logits(frames)?;
        let classify_ms = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
        self.combine(&logits, 1, first_frame, 0.0, classify_ms)
    }

    /// Groups `votes` consecutive logit rows per frame into decisions (steps filled by caller);
    /// `purify_ms` and `classify_ms` are each frame's share of the batch's time.
    fn combine(
        &self,
        logits: &Array2<f32>,
        votes: usize,
        first_frame: u64,
        purify_ms: f64,
        classify_ms: f64,
    ) -> Result<Vec<Decision>> {
        if let Some((row, _)) =
            logits.outer_iter().enumerate().find(|(_, r)| r.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::Backend(format!(
                "the classifier returned non-finite logits for image {row} of its batch"
            )));
        }
        let probs = softmax_rows(logits);
        Ok(probs
            .axis_chunks_iter(Axis(0), votes)
            .enumerate()
            .map(|(f, p)| {
                let mut d = self.rule.decide(p, &self.classes, first_frame + f as u64, self.seed);
                d.purify_ms = purify_ms;
                d.classify_ms = classify_ms;
                d
            })
            .collect())
    }
}

/// The noise streams of a batch of frames: frame i is frame `first + i` of `domain`.
#[derive(Debug, Clone, Copy)]
struct FrameIds {
    domain: NoiseDomain,
    first: u64,
}

impl FrameIds {
    fn frames(first: u64) -> Self {
        Self { domain: NoiseDomain::Frames, first }
    }
}

impl Pipeline {
    /// Builds the pipeline a configuration describes: manifest, plan, backends.
    pub fn from_config(config: &crate::config::DefenseConfig) -> Result<Self> {
        config.validate()?;
        let manifest = crate::manifest::Manifest::load(&config.models_dir()?)?;
        let entry = manifest.denoiser(&config.denoiser)?;
        let plan = DdimPlan::new(
            &manifest.schedule()?,
            entry.trained_range(),
            config.t_star,
            &config.plan_spec()?,
            config.eta,
        )?;
        let models = crate::backend::load(&manifest, config)?;
        let mut pipeline = Self::new(
            manifest.schedule()?,
            entry.trained_range(),
            plan,
            models.denoiser,
            models.classifier,
            manifest.classifier.classes.clone(),
            config.votes,
            config.vote_rule,
            config.resolve_seed()?,
        )?;
        if let Some(bare) = models.bare_classifier {
            pipeline.set_bare_classifier(bare);
        }
        pipeline.set_decision_rule(DecisionRule {
            vote_rule: config.vote_rule,
            top_k: config.top_k,
            min_confidence: config.min_confidence,
        });
        Ok(pipeline)
    }
}
