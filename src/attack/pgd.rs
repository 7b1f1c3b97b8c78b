//! Projected gradient descent (Madry et al. 2018) for Linf and L2 threat models, ascending
//! whatever loss gradient it is given: the bare classifier's, BPDA's or the full purifier's
//! with EOT (see [`super::gradients`]). It never leaves the eps-ball around the clean image nor
//! the \[0,1\] pixel box.

use super::{Attack, Norm, Target, ThreatModel};
use crate::error::{Error, Result};
use crate::noise::fill_standard_normal;
use ndarray::{Array4, ArrayView4, Axis, Zip};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

/// The gradient PGD ascends.
pub trait LossGradient {
    /// Gradient of the summed attack loss with respect to `images` (\[0,1\] pixels) at PGD
    /// iteration `iteration` (0-based; stochastic gradients draw fresh noise per iteration).
    fn loss_grad(
        &mut self,
        images: ArrayView4<f32>,
        labels: &[usize],
        iteration: usize,
    ) -> Result<Array4<f32>>;

    /// The per-image loss (averaged over the same EOT samples) with its gradient, for attacks
    /// that track the best point (APGD). Gradients that cannot report a loss refuse.
    fn loss_values_and_grad(
        &mut self,
        images: ArrayView4<f32>,
        labels: &[usize],
        iteration: usize,
    ) -> Result<(Vec<f32>, Array4<f32>)> {
        let _ = (images, labels, iteration);
        Err(Error::AttackUnavailable("this gradient reports no loss values".into()))
    }
}

/// Settings of one PGD run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PgdConfig {
    /// Norm and radius of the perturbation, in \[0,1\] pixel units.
    pub threat: ThreatModel,
    /// Gradient steps.
    pub steps: usize,
    /// Step length in \[0,1\] pixel units: per pixel for Linf (sign step), Euclidean for L2.
    pub step_size: f64,
    /// Start from a uniform random point of the ball instead of the clean image.
    pub random_start: bool,
    /// Seed of the random start.
    pub seed: u64,
}

impl PgdConfig {
    /// The customary step size: 2/255 for Linf 8/255 (eps/4), 2.5 * eps / steps for L2; eps
    /// for a single step (FGSM, or its L2 form).
    pub fn default_step_size(threat: ThreatModel, steps: usize) -> f64 {
        if steps == 1 {
            return threat.eps;
        }
        match threat.norm {
            Norm::Linf => threat.eps / 4.0,
            Norm::L2 => 2.5 * threat.eps / steps.max(1) as f64,
        }
    }
}

/// PGD as an [`Attack`]: `steps` steps of `step_size` along the target mode's gradient, from a
/// random point of the ball (seeded per batch from the target's seed, cell and first image).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pgd {
    /// Gradient steps.
    pub steps: usize,
    /// Step length in \[0,1\] pixel units (see [`PgdConfig::step_size`]).
    pub step_size: f64,
    /// Start from a uniform random point of the ball.
    pub random_start: bool,
}

impl Attack for Pgd {
    fn craft(
        &self,
        target: &mut Target<'_, '_>,
        images: ArrayView4<f32>,
        labels: &[usize],
        threat: ThreatModel,
    ) -> Result<Array4<f32>> {
        let batch = target.first() as u64 ^ (u64::from(target.cell()) << 20);
        let cfg = PgdConfig {
            threat,
            steps: self.steps,
            step_size: self.step_size,
            random_start: self.random_start,
            seed: target.seed() ^ batch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        target.with_gradient(|g| pgd(g, images, labels, &cfg))
    }
}

/// Runs PGD from `images` (\[0,1\] pixels, NCHW) and returns the final iterate.
pub fn pgd(
    grad: &mut dyn LossGradient,
    images: ArrayView4<f32>,
    labels: &[usize],
    cfg: &PgdConfig,
) -> Result<Array4<f32>> {
    if labels.len() != images.shape()[0] {
        return Err(Error::InvalidConfig(format!(
            "{} labels for {} images",
            labels.len(),
            images.shape()[0]
        )));
    }
    if !(cfg.step_size.is_finite() && cfg.step_size >= 0.0) {
        return Err(Error::InvalidConfig(format!("PGD step size {} is not >= 0", cfg.step_size)));
    }
    let eps = cfg.threat.eps as f32;
    let mut x = images.to_owned();
    if cfg.random_start && eps > 0.0 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
        let mut delta = Array4::<f32>::zeros(images.raw_dim());
        match cfg.threat.norm {
            Norm::Linf => delta.iter_mut().for_each(|d| *d = eps * (2.0 * uniform(&mut rng) - 1.0)),
            Norm::L2 => {
                let mut z = vec![0.0f32; images.shape()[1..].iter().product()];
                for mut item in delta.outer_iter_mut() {
                    fill_standard_normal(&mut rng, &mut z);
                    item.iter_mut().zip(&z).for_each(|(d, &zi)| *d = zi);
                    let norm = item.iter().map(|d| d * d).sum::<f32>().sqrt().max(1e-12);
                    let radius = eps * uniform(&mut rng);
                    item.iter_mut().for_each(|d| *d *= radius / norm);
                }
            }
        }
        x += &delta;
        project(&mut x, images, cfg.threat);
    }
    for k in 0..cfg.steps {
        let g = grad.loss_grad(x.view(), labels, k)?;
        if g.shape() != x.shape() {
            return Err(Error::Backend(format!(
                "gradient shape {:?} for images {:?}",
                g.shape(),
                x.shape()
            )));
        }
        let alpha = cfg.step_size as f32;
        match cfg.threat.norm {
            Norm::Linf => Zip::from(&mut x).and(&g).for_each(|v, &gi| *v += alpha * sign(gi)),
            Norm::L2 => {
                for (mut item, gi) in x.outer_iter_mut().zip(g.outer_iter()) {
                    let norm = gi.iter().map(|v| v * v).sum::<f32>().sqrt();
                    if norm > 0.0 && norm.is_finite() {
                        Zip::from(&mut item).and(&gi).for_each(|v, &d| *v += alpha * d / norm);
                    }
                }
            }
        }
        project(&mut x, images, cfg.threat);
    }
    Ok(x)
}

/// Projects `x` onto the threat model's ball around `clean`, then onto the \[0,1\] box (which
/// only moves coordinates towards the clean image, so the result stays in the ball).
pub fn project(x: &mut Array4<f32>, clean: ArrayView4<f32>, threat: ThreatModel) {
    let eps = threat.eps as f32;
    match threat.norm {
        Norm::Linf => {
            Zip::from(&mut *x).and(clean).for_each(|v, &c| *v = v.clamp(c - eps, c + eps))
        }
        Norm::L2 => {
            for (mut item, c) in x.outer_iter_mut().zip(clean.outer_iter()) {
                let norm = Zip::from(&item).and(&c).fold(0.0f32, |s, &v, &ci| s + (v - ci).powi(2));
                let norm = norm.sqrt();
                if norm > eps {
                    let scale = eps / norm;
                    Zip::from(&mut item).and(&c).for_each(|v, &ci| *v = ci + (*v - ci) * scale);
                }
            }
        }
    }
    x.mapv_inplace(|v| v.clamp(0.0, 1.0));
}

/// Largest distance of each image from its clean version in the threat model's norm.
pub fn distances(x: ArrayView4<f32>, clean: ArrayView4<f32>, norm: Norm) -> Vec<f64> {
    x.axis_iter(Axis(0))
        .zip(clean.axis_iter(Axis(0)))
        .map(|(a, b)| {
            let d = Zip::from(&a).and(&b);
            match norm {
                Norm::Linf => d.fold(0.0f64, |m, &u, &v| m.max(f64::from(u - v).abs())),
                Norm::L2 => d.fold(0.0f64, |s, &u, &v| s + f64::from(u - v).powi(2)).sqrt(),
            }
        })
        .collect()
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn uniform(rng: &mut Xoshiro256PlusPlus) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}
