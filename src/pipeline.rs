//! frame → purifier → classifier → decision, with several purifications ("votes") per frame
//! run as one batch and combined into one decision.

use crate::backend::{Classifier, Denoiser};
use crate::config::VoteRule;
use crate::error::{Error, Result};
use crate::noise::{SeededNoise, StreamId};
use crate::purify::{purify, validate_images};
use crate::schedule::DdimPlan;
use ndarray::{Array2, Array4, ArrayView4, Axis};
use serde::Serialize;
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
    /// DDIM steps run (0 for the undefended classifier).
    pub steps: usize,
    /// This frame's share of the batch's purification time, seconds.
    pub purify_s: f64,
    /// This frame's share of the batch's classification time, seconds.
    pub classify_s: f64,
}

/// The defended classifier: a DDIM plan, a denoiser and a classifier.
pub struct Pipeline {
    plan: DdimPlan,
    denoiser: Box<dyn Denoiser>,
    classifier: Box<dyn Classifier>,
    classes: Vec<String>,
    votes: u32,
    rule: VoteRule,
    seed: u64,
}

impl Pipeline {
    /// Assembles a pipeline; `classes` are the classifier's class names in logit order.
    pub fn new(
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
        Ok(Self { plan, denoiser, classifier, classes, votes, rule, seed })
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

    /// The classifier, for undefended use and attacks.
    pub fn classifier_mut(&mut self) -> &mut dyn Classifier {
        self.classifier.as_mut()
    }

    /// The denoiser, for attacks and diagnostics.
    pub fn denoiser_mut(&mut self) -> &mut dyn Denoiser {
        self.denoiser.as_mut()
    }

    /// Purifies `frames` ([0,1] pixels, NCHW), `votes` times each, all in one batch; frame i has
    /// index `first_frame + i`. Returns the purified images ordered frame-major
    /// ([frame0 vote0, frame0 vote1, ...]).
    pub fn purify_votes(
        &mut self,
        frames: ArrayView4<f32>,
        first_frame: u64,
    ) -> Result<Array4<f32>> {
        let v = self.votes as usize;
        let items: Vec<StreamId> = (0..frames.shape()[0] as u64)
            .flat_map(|f| {
                (0..self.votes).map(move |vote| StreamId { frame: first_frame + f, vote })
            })
            .collect();
        let repeated = if v == 1 {
            frames.to_owned()
        } else {
            let views: Vec<_> =
                frames.outer_iter().flat_map(|f| std::iter::repeat_n(f, v)).collect();
            ndarray::stack(Axis(0), &views).map_err(|e| Error::Backend(e.to_string()))?
        };
        let mut noise = SeededNoise::new(self.seed, items);
        purify(&self.plan, self.denoiser.as_mut(), repeated.view(), &mut noise)
    }

    /// Classifies `frames` through the defence; frame i has index `first_frame + i`.
    pub fn decide(&mut self, frames: ArrayView4<f32>, first_frame: u64) -> Result<Vec<Decision>> {
        let n = frames.shape()[0];
        if n == 0 {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let purified = self.purify_votes(frames, first_frame)?;
        let t1 = Instant::now();
        let logits = self.classifier.logits(purified.view())?;
        let t2 = Instant::now();
        let share = |d: std::time::Duration| d.as_secs_f64() / n as f64;
        let (purify_s, classify_s) = (share(t1 - t0), share(t2 - t1));
        Ok(self.combine(
            &logits,
            self.votes as usize,
            first_frame,
            self.plan.steps().len(),
            purify_s,
            classify_s,
        ))
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
        Ok(self.combine(&logits, 1, first_frame, 0, 0.0, classify_s))
    }

    /// Groups `votes` consecutive logit rows per frame into decisions.
    fn combine(
        &self,
        logits: &Array2<f32>,
        votes: usize,
        first_frame: u64,
        steps: usize,
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
                    steps,
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
