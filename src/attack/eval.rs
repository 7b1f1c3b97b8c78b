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

/// Per-image number of correct runs out of `runs`, each run deciding every image with fresh
/// noise: run r draws from [`NoiseDomain::Evaluation`] `{ cell, run: r }`, image i being frame
/// `first + i` (its index in the data), so an image's noise does not depend on its batch.
pub fn correct_runs(
    pipeline: &mut Pipeline,
    what: Evaluated,
    images: ArrayView4<f32>,
    labels: &[usize],
    runs: u32,
    cell: u32,
    first: usize,
) -> Result<Vec<u32>> {
    let n = labels.len();
    let mut correct = vec![0u32; n];
    for run in 0..runs {
        let decisions = match what {
            Evaluated::Defended => {
                pipeline.decide_in(images, NoiseDomain::Evaluation { cell, run }, first as u64)?
            }
            Evaluated::Undefended => pipeline.decide_undefended(images, first as u64)?,
        };
        for (i, d) in decisions.iter().enumerate() {
            correct[i] += u32::from(d.label == Some(labels[i]));
        }
    }
    Ok(correct)
}
