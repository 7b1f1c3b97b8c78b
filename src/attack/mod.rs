//! Attacks on the deployed pipeline. So far: threat models and the gradient-free Square Attack,
//! which needs only the deployed forward pass, whatever backend runs it.

pub mod eval;
pub mod gradients;
pub mod harness;
pub mod pgd;
pub mod report;
pub mod square;

use crate::error::{Error, Result};
use ndarray::{Array2, ArrayView4};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The norm of a threat model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Largest per-pixel change.
    Linf,
    /// Euclidean norm of the whole change.
    L2,
}

/// A perturbation budget: norm and radius eps, in [0,1] pixel units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThreatModel {
    /// The norm.
    pub norm: Norm,
    /// The radius, in [0,1] pixel units (8/255 = 0.0314 for Linf).
    pub eps: f64,
}

impl ThreatModel {
    /// The paper's four threat models: Linf 8/255, Linf 16/255, L2 1, L2 2.
    pub fn paper_defaults() -> Vec<ThreatModel> {
        vec![
            ThreatModel { norm: Norm::Linf, eps: 8.0 / 255.0 },
            ThreatModel { norm: Norm::Linf, eps: 16.0 / 255.0 },
            ThreatModel { norm: Norm::L2, eps: 1.0 },
            ThreatModel { norm: Norm::L2, eps: 2.0 },
        ]
    }
}

impl FromStr for ThreatModel {
    type Err = Error;

    /// Parses `linf:8/255`, `linf:0.03`, `l2:1.0`, `l2:1/2`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidConfig(format!(
                "threat model {s:?}: expected NORM:EPS with NORM linf or l2 and EPS a number or a \
                 fraction, e.g. linf:8/255 or l2:1.0"
            ))
        };
        let (norm, eps) = s.split_once(':').ok_or_else(bad)?;
        let norm = match norm.trim().to_ascii_lowercase().as_str() {
            "linf" => Norm::Linf,
            "l2" => Norm::L2,
            _ => return Err(bad()),
        };
        let eps = match eps.split_once('/') {
            Some((a, b)) => {
                let (a, b): (f64, f64) =
                    (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                a / b
            }
            None => eps.trim().parse().map_err(|_| bad())?,
        };
        if !eps.is_finite() || eps < 0.0 {
            return Err(bad());
        }
        Ok(ThreatModel { norm, eps })
    }
}

impl fmt::Display for ThreatModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = match self.norm {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
        };
        match self.norm {
            Norm::Linf => write!(f, "{n}:{}/255", (self.eps * 255.0 * 1e4).round() / 1e4),
            Norm::L2 => write!(f, "{n}:{}", self.eps),
        }
    }
}

/// What a black-box attack may call: class scores of a batch of images ([0,1] pixels, NCHW).
/// `query` numbers the call so a stochastic defence can draw fresh, reproducible noise for it.
pub trait Scored {
    /// Scores (N x classes, higher = more likely; logits or probabilities) of `images`.
    fn scores(&mut self, images: ArrayView4<f32>, query: u64) -> Result<Array2<f32>>;
}

impl<F: FnMut(ArrayView4<f32>, u64) -> Result<Array2<f32>>> Scored for F {
    fn scores(&mut self, images: ArrayView4<f32>, query: u64) -> Result<Array2<f32>> {
        self(images, query)
    }
}

/// Untargeted margin: score of the true class minus the best other score (< 0: misclassified).
pub fn margin(scores: ndarray::ArrayView1<f32>, label: usize) -> f32 {
    let other = scores
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != label)
        .map(|(_, &v)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    scores[label] - other
}
