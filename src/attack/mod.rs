//! Attacks on the deployed pipeline: threat models, the attacks (PGD along the mode's gradient,
//! the gradient-free Square Attack), final evaluation with fresh noise, the harness cell and the
//! reports.

pub mod apgd;
pub mod eval;
pub mod gradients;
pub mod harness;
pub mod pgd;
pub mod protocol;
pub mod report;
pub mod square;
pub mod suite;

pub use harness::Target;

use crate::error::{Error, Result};
use ndarray::{Array2, Array4, ArrayView4};

/// One attack: crafts adversarial versions of a batch of images against a [`Target`], within a
/// threat model. PGD and Square implement it; the harness runs any of them the same way and
/// then evaluates the result on the deployed pipeline.
pub trait Attack {
    /// Adversarial `images` (\[0,1\] pixels, NCHW) for true `labels`, inside `threat`'s ball
    /// around `images` and the \[0,1\] box.
    fn craft(
        &self,
        target: &mut Target<'_, '_>,
        images: ArrayView4<f32>,
        labels: &[usize],
        threat: ThreatModel,
    ) -> Result<Array4<f32>>;
}

/// Which attack crafts a cell's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// PGD along the mode's gradient ([`pgd::Pgd`]).
    Pgd,
    /// The gradient-free Square Attack on the deployed pipeline's outputs ([`square::Square`]).
    Square,
    /// APGD along the mode's gradient with the configured loss ([`apgd::Apgd`]).
    Apgd,
    /// AutoAttack's `rand` version: APGD-CE and APGD-DLR, per image the worst of the two.
    AaRand,
}

impl fmt::Display for AttackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttackKind::Pgd => "pgd",
            AttackKind::Square => "square",
            AttackKind::Apgd => "apgd",
            AttackKind::AaRand => "aa-rand",
        })
    }
}

/// Parses `2/255` or `0.0078` (a step size, an eps, a threshold).
pub fn parse_fraction(s: &str) -> Result<f64> {
    let bad = || Error::InvalidConfig(format!("{s:?} is not a number or fraction"));
    let v = match s.split_once('/') {
        Some((a, b)) => {
            a.trim().parse::<f64>().map_err(|_| bad())?
                / b.trim().parse::<f64>().map_err(|_| bad())?
        }
        None => s.trim().parse::<f64>().map_err(|_| bad())?,
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(bad())
    }
}
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

/// A perturbation budget: norm and radius eps, in \[0,1\] pixel units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThreatModel {
    /// The norm.
    pub norm: Norm,
    /// The radius, in \[0,1\] pixel units (8/255 = 0.0314 for Linf).
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
        let eps = parse_fraction(eps).map_err(|_| bad())?;
        if eps < 0.0 {
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

/// What a black-box attack may call: class scores of a batch of images (\[0,1\] pixels, NCHW).
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
