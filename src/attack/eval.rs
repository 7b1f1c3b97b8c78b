//! Final evaluation of adversarial images on the deployed pipeline: `runs` passes with fresh
//! noise, counted three ways (mean over runs, correct in every run, correct in most runs).

use crate::error::Result;
use crate::noise::NoiseDomain;
use crate::pipeline::Pipeline;
use ndarray::ArrayView4;
use serde::{Deserialize, Serialize};

/// Accuracy of a set of images over several fresh-noise runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunAccuracy {
    /// Mean over runs of the fraction correct.
    pub mean: f64,
    /// Fraction of images correct in every run (the robust-only-if-always-right count).
    pub worst: f64,
    /// Fraction of images correct in more than half of the runs.
    pub majority: f64,
}

impl RunAccuracy {
    /// Summarises per-image counts of correct runs out of `runs`.
    pub fn from_counts(correct: &[u32], runs: u32) -> Self {
        let n = correct.len().max(1) as f64;
        let r = f64::from(runs.max(1));
        Self {
            mean: correct.iter().map(|&c| f64::from(c) / r).sum::<f64>() / n,
            worst: correct.iter().filter(|&&c| c >= runs).count() as f64 / n,
            majority: correct.iter().filter(|&&c| 2 * c > runs).count() as f64 / n,
        }
    }
}

/// Whether the decision is the defended pipeline's or the bare classifier's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evaluated {
    /// The full purifier ahead of the classifier, as deployed.
    Defended,
    /// The classifier alone.
    Undefended,
}

/// Which noise the evaluation runs draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalNoise {
    /// Run r draws from [`NoiseDomain::Evaluation`] `{ cell, run: r }`: fresh noise each run.
    Fresh {
        /// The cell (0: the clean images).
        cell: u32,
    },
    /// Every run draws the noise of run 0, the noise the known-noise attacker was given, so
    /// the runs agree and one pass stands for all of them.
    Known {
        /// The cell.
        cell: u32,
    },
}

/// One image's evaluation over the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Runs that classified it correctly.
    pub correct: u32,
    /// The label it got most often (the smallest on a tie; `None`: abstained most often).
    pub predicted: Option<usize>,
}

/// Per image, how `runs` evaluation runs decided it; image i is frame `first + i` (its index in
/// the data), so an image's noise does not depend on its batch.
pub fn evaluate_runs(
    pipeline: &mut Pipeline,
    what: Evaluated,
    images: ArrayView4<f32>,
    labels: &[usize],
    runs: u32,
    noise: EvalNoise,
    first: usize,
) -> Result<Vec<Tally>> {
    let n = labels.len();
    let (cell, passes) = match noise {
        EvalNoise::Fresh { cell } => (cell, runs),
        EvalNoise::Known { cell } => (cell, runs.min(1)),
    };
    // The undefended classifier is deterministic: one pass stands for every run.
    let passes = if what == Evaluated::Undefended { passes.min(1) } else { passes };
    let mut seen: Vec<std::collections::BTreeMap<Option<usize>, u32>> = vec![Default::default(); n];
    for run in 0..passes {
        let decisions = match what {
            Evaluated::Defended => {
                pipeline.decide_in(images, NoiseDomain::Evaluation { cell, run }, first as u64)?
            }
            Evaluated::Undefended => pipeline.decide_undefended(images, first as u64)?,
        };
        for (i, d) in decisions.iter().enumerate().take(n) {
            *seen[i].entry(d.label).or_default() += 1;
        }
    }
    let scale = runs.checked_div(passes).unwrap_or(0);
    Ok(seen
        .iter()
        .zip(labels)
        .map(|(m, &label)| Tally {
            correct: m.get(&Some(label)).copied().unwrap_or(0) * scale,
            // Most votes wins; BTreeMap order makes the smallest label win a tie (None first,
            // so a labelled answer beats an abstention only with more votes).
            predicted: m
                .iter()
                .fold((None, 0), |(best, c), (&k, &v)| if v > c { (k, v) } else { (best, c) })
                .0,
        })
        .collect())
}
