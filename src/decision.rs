//! What the defence says about one frame, and how a frame's votes become it: the vote rule,
//! the confidence, top-k with class names, and abstention below a confidence threshold.

use crate::config::VoteRule;
use ndarray::{Array2, ArrayView2, Axis};
use serde::{Serialize, Serializer};

/// The class name a [`Decision`] carries when the defence abstains.
pub const UNKNOWN_CLASS: &str = "unknown";

/// How sure the defence is of its label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Confidence {
    /// Share of the frame's votes (purifications) whose own argmax is the label, in \[0, 1\].
    #[serde(serialize_with = "round_prob")]
    pub vote_share: f32,
    /// The label's softmax probability averaged over the votes, in \[0, 1\].
    #[serde(serialize_with = "round_prob")]
    pub mean_prob: f32,
}

/// One class and its mean probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// Class index (logit order).
    pub label: usize,
    /// Class name.
    pub class: String,
    /// Softmax probability averaged over the votes, in \[0, 1\].
    #[serde(serialize_with = "round_prob")]
    pub prob: f32,
}

/// The outcome for one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Index of the frame in its stream or data set (keys its noise streams with `seed`).
    pub frame: u64,
    /// Seed of the noise streams: (seed, frame) replays this decision bit for bit (same
    /// backend, thread count, batch size and votes).
    pub seed: u64,
    /// Predicted class index; `None` when the defence abstained (the label's mean probability
    /// was below the configured `min_confidence`).
    pub label: Option<usize>,
    /// Predicted class name, or [`UNKNOWN_CLASS`] when abstaining.
    pub class: String,
    /// Confidence of the label the votes chose (also when abstaining: it says why).
    pub confidence: Confidence,
    /// The most probable classes by mean probability, best first.
    pub top_k: Vec<ClassScore>,
    /// Mean softmax probabilities over the votes, one per class (logit order).
    #[serde(serialize_with = "round_probs")]
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
    /// This frame's share of its batch's purification time, ms.
    #[serde(serialize_with = "round_ms")]
    pub purify_ms: f64,
    /// This frame's share of its batch's classification time, ms.
    #[serde(serialize_with = "round_ms")]
    pub classify_ms: f64,
}

/// How a frame's votes become its decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionRule {
    /// How votes are combined.
    pub vote_rule: VoteRule,
    /// Classes listed in [`Decision::top_k`].
    pub top_k: usize,
    /// Abstain (label `None`) when the chosen label's mean probability is below this.
    pub min_confidence: Option<f32>,
}

impl Default for DecisionRule {
    fn default() -> Self {
        Self { vote_rule: VoteRule::Majority, top_k: 3, min_confidence: None }
    }
}

impl DecisionRule {
    /// The decision for one frame from its votes' softmax probabilities (`votes x classes`);
    /// timings, steps and the deadline are the caller's to fill in.
    pub(crate) fn decide(
        &self,
        probs: ArrayView2<f32>,
        classes: &[String],
        frame: u64,
        seed: u64,
    ) -> Decision {
        let votes = probs.nrows().max(1);
        let mean: Vec<f32> = match probs.mean_axis(Axis(0)) {
            Some(m) => m.to_vec(),
            None => vec![0.0; probs.ncols()],
        };
        let vote_labels: Vec<usize> =
            probs.outer_iter().map(|r| argmax(r.iter().copied())).collect();
        let chosen = match self.vote_rule {
            VoteRule::MeanProb => argmax(mean.iter().copied()),
            VoteRule::Majority => majority(&vote_labels, &mean),
        };
        let confidence = Confidence {
            vote_share: vote_labels.iter().filter(|&&l| l == chosen).count() as f32 / votes as f32,
            mean_prob: mean.get(chosen).copied().unwrap_or(0.0),
        };
        let name = |k: usize| classes.get(k).cloned().unwrap_or_else(|| k.to_string());
        let mut order: Vec<usize> = (0..mean.len()).collect();
        // Stable sort: equal probabilities keep logit order.
        order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]));
        let top_k = order
            .iter()
            .take(self.top_k)
            .map(|&k| ClassScore { label: k, class: name(k), prob: mean[k] })
            .collect();
        let abstain = self.min_confidence.is_some_and(|m| confidence.mean_prob < m);
        let label = (!abstain).then_some(chosen);
        Decision {
            frame,
            seed,
            label,
            class: label.map_or_else(|| UNKNOWN_CLASS.to_string(), name),
            confidence,
            top_k,
            probs: mean,
            vote_labels,
            planned_steps: 0,
            steps: 0,
            anytime: false,
            deadline_met: None,
            purify_ms: 0.0,
            classify_ms: 0.0,
        }
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

/// Probabilities in JSON: 6 decimals (the f32 digits beyond carry no information a reader
/// uses, and a line of ten probabilities stays readable).
fn round_prob<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_to(f64::from(*v), 1e6))
}

fn round_probs<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|&p| round_to(f64::from(p), 1e6)))
}

/// Durations in JSON: ms with 3 decimals (1 us).
pub(crate) fn round_ms<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_to(*v, 1e3))
}

/// `v` rounded to a multiple of `1 / scale`.
pub(crate) fn round_to(v: f64, scale: f64) -> f64 {
    if v.is_finite() {
        (v * scale).round() / scale
    } else {
        v
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

    #[test]
    fn confidence_top_k_and_abstention() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let probs = ndarray::array![[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]];
        let rule = DecisionRule { top_k: 2, ..DecisionRule::default() };
        let d = rule.decide(probs.view(), &classes, 4, 9);
        assert_eq!((d.label, d.class.as_str(), d.frame, d.seed), (Some(0), "a", 4, 9));
        assert!((d.confidence.vote_share - 2.0 / 3.0).abs() < 1e-6);
        assert!((d.confidence.mean_prob - 1.3 / 3.0).abs() < 1e-6);
        assert_eq!(d.top_k.iter().map(|c| c.label).collect::<Vec<_>>(), vec![1, 0]);
        let strict = DecisionRule { min_confidence: Some(0.5), ..rule };
        let d = strict.decide(probs.view(), &classes, 4, 9);
        assert_eq!((d.label, d.class.as_str()), (None, UNKNOWN_CLASS));
        let json = serde_json::to_value(&d).unwrap();
        assert!(json["label"].is_null());
        assert_eq!(json["probs"][0], 0.433333);
    }
}
