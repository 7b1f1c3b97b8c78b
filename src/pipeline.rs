//! frame → purifier → classifier → decision, with several purifications ("votes") per frame
//! run as one batch and combined into one decision.

use crate::backend::{Classifier, Denoiser};
use crate::budget::{plan_frame, BudgetLimits, CostModel};
use crate::config::VoteRule;
use crate::error::{Error, Result};
use crate::noise::{SeededNoise, StreamId};
use crate::purify::{validate_images, Purification};
use crate::schedule::{DdimPlan, PlanSpec, Schedule};
use ndarray::{Array2, Array4, ArrayView4, Axis};
use serde::Serialize;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

/// The outcome for one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Index of the frame in its stream or data set (keys its noise streams).
    pub frame: u64,
    /// Predicted class index.
    pub label: usize,
    /// Predicted class name.
    pub class: String,
    /// Mean softmax probabilities over the votes, one per class.
    pub probs: Vec<f32>,
    /// The label each vote chose, in vote order.
    pub vote_labels: Vec<usize>,
    /// DDIM steps planned for the frame (0 for the undefended classifier).
    pub planned_steps: usize,
    /// DDIM steps actually run; fewer than planned when the deadline cut the frame short.
    pub steps: usize,
    /// True when the frame was classified from an intermediate x0 estimate (deadline reached).
    pub anytime: bool,
    /// Whether the frame finished within its latency budget; `None` without a budget.
    pub deadline_met: Option<bool>,
    /// This frame's share of the batch's purification time, seconds.
    pub purify_s: f64,
    /// This frame's share of the batch's classification time, seconds.
    pub classify_s: f64,
}

/// A per-frame latency budget and what the planner may choose within it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Seconds allowed for purifying and classifying one frame.
    pub seconds: f64,
    /// Step and vote limits.
    pub limits: BudgetLimits,
}

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
    classes: Vec<String>,
    votes: u32,
    rule: VoteRule,
    seed: u64,
    costs: CostModel,
}

impl Pipeline {
    /// Assembles a pipeline; `plan` must come from `schedule` and the denoiser's `trained` t
    /// range (the budget planner derives coarser plans from them); `classes` are the
    /// classifier's class names in logit order.
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
            classes,
            votes,
            rule,
            seed,
            costs: CostModel::default(),
        })
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

    /// The classifier, for undefended use and attacks.
    pub fn classifier_mut(&mut self) -> &mut dyn Classifier {
        self.classifier.as_mut()
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
        first_frame: u64,
        votes: u32,
        steps: usize,
        deadline: Option<(Instant, f64)>,
    ) -> Result<Purified> {
        let v = votes as usize;
        let items: Vec<StreamId> = (0..frames.shape()[0] as u64)
            .flat_map(|f| (0..votes).map(move |vote| StreamId { frame: first_frame + f, vote }))
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

    /// Purifies `frames` ([0,1] pixels, NCHW), `votes` times each, all in one batch; frame i has
    /// index `first_frame + i`. Returns the purified images ordered frame-major
    /// ([frame0 vote0, frame0 vote1, ...]).
    pub fn purify_votes(
        &mut self,
        frames: ArrayView4<f32>,
        first_frame: u64,
    ) -> Result<Array4<f32>> {
        let steps = self.plan.steps().len();
        Ok(self.run_purification(frames, first_frame, self.votes, steps, None)?.images)
    }

    /// Classifies `frames` through the defence; frame i has index `first_frame + i`.
    pub fn decide(&mut self, frames: ArrayView4<f32>, first_frame: u64) -> Result<Vec<Decision>> {
        let steps = self.plan.steps().len();
        self.decide_with(frames, first_frame, self.votes, steps, None)
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
        let mut d = self.decide_with(frame, index, votes, steps, Some((start, budget.seconds)))?;
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
            for _ in 0..CALIBRATION_WARMUP {
                self.decide_with(probe.view(), 0, votes, 2, None)?;
            }
            self.costs = saved;
            for _ in 0..CALIBRATION_RUNS {
                self.decide_with(probe.view(), 0, votes, 2, None)?;
            }
        }
        if plan_frame(&self.costs, budget.seconds, &l).is_none() {
            let v = l.min_votes.max(1);
            return Err(Error::InvalidConfig(format!(
                "a budget of {:.1} ms cannot fit even {} DDIM step(s) with {v} vote(s): one step \
                 takes about {:.1} ms and the classifier {:.1} ms on this backend",
                budget.seconds * 1e3,
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
        first_frame: u64,
        votes: u32,
        steps: usize,
        deadline: Option<(Instant, f64)>,
    ) -> Result<Vec<Decision>> {
        let n = frames.shape()[0];
        if n == 0 {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let purified = self.run_purification(frames, first_frame, votes, steps, deadline)?;
        let t1 = Instant::now();
        let logits = self.classifier.logits(purified.images.view())?;
        let t2 = Instant::now();
        self.costs.record_classify(purified.images.shape()[0], (t2 - t1).as_secs_f64());
        let share = |d: std::time::Duration| d.as_secs_f64() / n as f64;
        let mut out =
            self.combine(&logits, votes as usize, first_frame, share(t1 - t0), share(t2 - t1));
        for d in &mut out {
            d.planned_steps = steps;
            d.steps = purified.steps;
            d.anytime = purified.anytime;
        }
        Ok(out)
    }

    /// Classifies `frames` with the bare classifier (no purification).
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
        let logits = self.classifier.logits(frames)?;
        let classify_s = t0.elapsed().as_secs_f64() / n as f64;
        Ok(self.combine(&logits, 1, first_frame, 0.0, classify_s))
    }

    /// Groups `votes` consecutive logit rows per frame into decisions (steps filled by caller).
    fn combine(
        &self,
        logits: &Array2<f32>,
        votes: usize,
        first_frame: u64,
        purify_s: f64,
        classify_s: f64,
    ) -> Vec<Decision> {
        let probs = softmax_rows(logits);
        probs
            .axis_chunks_iter(Axis(0), votes)
            .enumerate()
            .map(|(f, p)| {
                let mean = p.mean_axis(Axis(0)).expect("a frame has at least one vote").to_vec();
                let vote_labels: Vec<usize> =
                    p.outer_iter().map(|r| argmax(r.iter().copied())).collect();
                let label = match self.rule {
                    VoteRule::MeanProb => argmax(mean.iter().copied()),
                    VoteRule::Majority => majority(&vote_labels, &mean),
                };
                Decision {
                    frame: first_frame + f as u64,
                    label,
                    class: self.classes.get(label).cloned().unwrap_or_else(|| label.to_string()),
                    probs: mean,
                    vote_labels,
                    planned_steps: 0,
                    steps: 0,
                    anytime: false,
                    deadline_met: None,
                    purify_s,
                    classify_s,
                }
            })
            .collect()
    }
}

/// Row-wise softmax, computed stably.
pub fn softmax_rows(logits: &Array2<f32>) -> Array2<f32> {
    let mut p = logits.clone();
    for mut row in p.outer_iter_mut() {
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|x| (x - m).exp());
        let s = row.sum();
        row.mapv_inplace(|x| x / s);
    }
    p
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: impl IntoIterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.into_iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// The most frequent label; ties go to the tied label with the highest mean probability.
fn majority(labels: &[usize], mean_probs: &[f32]) -> usize {
    let mut counts = vec![0usize; mean_probs.len().max(1)];
    for &l in labels {
        if let Some(c) = counts.get_mut(l) {
            *c += 1;
        }
    }
    let top = counts.iter().copied().max().unwrap_or(0);
    argmax(
        mean_probs.iter().zip(&counts).map(|(&p, &c)| if c == top { p } else { f32::NEG_INFINITY }),
    )
}

impl Pipeline {
    /// Builds the pipeline a configuration describes: manifest, plan, backends.
    pub fn from_config(config: &crate::config::DefenseConfig) -> Result<Self> {
        config.validate()?;
        let manifest = crate::manifest::Manifest::load(&config.models)?;
        let entry = manifest.denoiser(&config.denoiser)?;
        let plan = DdimPlan::new(
            &manifest.schedule()?,
            entry.trained_range(),
            config.t_star,
            &config.plan_spec()?,
            config.eta,
        )?;
        let (denoiser, classifier) = crate::backend::load(&manifest, config)?;
        Self::new(
            manifest.schedule()?,
            entry.trained_range(),
            plan,
            denoiser,
            classifier,
            manifest.classifier.classes.clone(),
            config.votes,
            config.vote_rule,
            config.seed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_breaks_ties_by_mean_probability() {
        assert_eq!(majority(&[1, 2, 2, 1], &[0.0, 0.3, 0.7]), 2);
        assert_eq!(majority(&[1, 1, 2], &[0.0, 0.3, 0.7]), 1);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_survive_large_logits() {
        let p = softmax_rows(&ndarray::array![[1000.0, 0.0], [0.0, 0.0]]);
        assert!((p[[0, 0]] - 1.0).abs() < 1e-6 && p[[0, 1]] < 1e-6);
        assert!((p[[1, 0]] - 0.5).abs() < 1e-6);
    }
}
