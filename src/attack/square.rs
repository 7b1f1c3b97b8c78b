//! Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): a score-based random
//! search that needs no gradient, so it attacks the deployed pipeline through its forward pass,
//! stochastic purifier and all.
//!
//! Linf follows the paper: vertical-stripe initialisation, then each iteration sets one random
//! square window (side shrinking on the paper's p schedule) to +-eps per channel and keeps the
//! change if the margin loss drops. L2 is a simplified variant, said plainly: each iteration
//! redraws one square window of the perturbation as a centred pseudo-Gaussian bump of random
//! sign and projects the whole perturbation back onto the eps-ball (the paper instead moves mass
//! between two windows to stay on the sphere).

use super::{margin, Attack, Norm, Scored, Target, ThreatModel};
use crate::error::{Error, Result};
use crate::noise::stream;
use ndarray::{s, Array4, ArrayView4, Axis};
use rand_core::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;

/// Settings of one Square Attack run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SquareConfig {
    /// Threat model; eps in \[0,1\] pixel units.
    pub threat: ThreatModel,
    /// Query budget per image, the initialisation included (>= 1).
    pub queries: usize,
    /// Initial fraction of pixels a window covers (paper: 0.05 for Linf, 0.1 for L2).
    pub p_init: f64,
    /// Seed of the attack's own random choices.
    pub seed: u64,
    /// Stop attacking an image once one query misclassifies it. Right for a deterministic
    /// model; against a stochastic defence one lucky noise draw proves little, so there the
    /// attack should spend its whole budget driving the margin down.
    pub early_stop: bool,
}

/// What the attack did to each image.
#[derive(Debug, Clone, PartialEq)]
pub struct SquareOutcome {
    /// The adversarial images (\[0,1\] pixels, inside the eps-ball around the inputs).
    pub adversarial: Array4<f32>,
    /// Queries spent on each image (never more than the budget).
    pub queries: Vec<usize>,
    /// Whether the last accepted query misclassified the image (margin < 0).
    pub fooled: Vec<bool>,
    /// The last accepted margin of each image (true-class score minus best other).
    pub margin: Vec<f32>,
}

/// The paper's schedule: the window fraction halves at fixed points of a 10 000-query run,
/// scaled to the actual budget.
fn p_at(p_init: f64, it: usize, budget: usize) -> f64 {
    let it = (it as f64 / budget.max(1) as f64 * 10_000.0) as usize;
    let halvings =
        [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000].iter().filter(|&&b| it > b).count();
    p_init / f64::from(1u32 << halvings)
}

fn sign(rng: &mut Xoshiro256PlusPlus) -> f32 {
    if rng.next_u64() & 1 == 0 {
        -1.0
    } else {
        1.0
    }
}

fn below(rng: &mut Xoshiro256PlusPlus, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// Projects `delta` onto the ball of `threat` and the box so that x + delta stays in \[0,1\].
fn project(x: ArrayView4<f32>, delta: &mut Array4<f32>, threat: &ThreatModel) {
    let eps = threat.eps as f32;
    for (mut d, x) in delta.outer_iter_mut().zip(x.outer_iter()) {
        match threat.norm {
            Norm::Linf => d.mapv_inplace(|v| v.clamp(-eps, eps)),
            Norm::L2 => {
                let n = d.iter().map(|v| v * v).sum::<f32>().sqrt();
                if n > eps {
                    d.mapv_inplace(|v| v * eps / n);
                }
            }
        }
        ndarray::Zip::from(&mut d).and(&x).for_each(|d, &x| *d = (x + *d).clamp(0.0, 1.0) - x);
    }
}

/// Square as an [`Attack`] with a budget of `queries` per image; against the defended
/// pipeline it spends the whole budget (one lucky noise draw proves little), against the bare
/// classifier it stops at the first misclassifying query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Square {
    /// Query budget per image, the initialisation included.
    pub queries: usize,
}

impl Attack for Square {
    fn craft(
        &self,
        target: &mut Target<'_, '_>,
        images: ArrayView4<f32>,
        labels: &[usize],
        threat: ThreatModel,
    ) -> Result<Array4<f32>> {
        let cfg = SquareConfig {
            threat,
            queries: self.queries,
            p_init: if threat.norm == Norm::Linf { 0.05 } else { 0.1 },
            seed: target.seed() ^ target.first() as u64,
            early_stop: !target.mode().evaluates_defended(),
        };
        Ok(square_attack(target, images, labels, &cfg)?.adversarial)
    }
}

/// Runs the attack on `images` (\[0,1\] pixels, NCHW) with true `labels`. Every forward pass goes
/// through `model` on the images still being attacked, as one batch.
pub fn square_attack(
    model: &mut dyn Scored,
    images: ArrayView4<f32>,
    labels: &[usize],
    cfg: &SquareConfig,
) -> Result<SquareOutcome> {
    let (n, c, h, w) = images.dim();
    if labels.len() != n {
        return Err(Error::Shape {
            expected: format!("{n} labels"),
            got: format!("{}", labels.len()),
        });
    }
    if cfg.queries == 0 || !(cfg.p_init > 0.0 && cfg.p_init <= 1.0) {
        return Err(Error::InvalidConfig(
            "square attack needs queries >= 1 and p_init in (0, 1]".into(),
        ));
    }
    crate::purify::validate_images(images, "attack input")?;
    let mut rng = stream(cfg.seed, 0x5351_5541_5245, 0, 0); // "SQUARE"
    let eps = cfg.threat.eps as f32;
    let mut query_id = 0u64;

    // Initialisation: Linf vertical stripes of +-eps; L2 a random-sign pattern scaled to eps.
    let mut delta = Array4::<f32>::zeros((n, c, h, w));
    for mut d in delta.outer_iter_mut() {
        for ch in 0..c {
            for col in 0..w {
                let v = sign(&mut rng) * eps;
                d.slice_mut(s![ch, .., col]).fill(v);
            }
        }
    }
    if cfg.threat.norm == Norm::L2 {
        // Stripes of +-1 have norm sqrt(c*h*w); scale to the sphere of radius eps.
        let scale = 1.0 / ((c * h * w) as f32).sqrt();
        delta.mapv_inplace(|v| v * scale);
    }
    project(images, &mut delta, &cfg.threat);
    let scores = model.scores((&images + &delta).view(), query_id)?;
    query_id += 1;
    let mut best: Vec<f32> = (0..n).map(|i| margin(scores.row(i), labels[i])).collect();
    let mut queries = vec![1usize; n];
    let mut fooled: Vec<bool> = best.iter().map(|&m| m < 0.0).collect();

    for it in 1..cfg.queries {
        let active: Vec<usize> = (0..n).filter(|&i| !(cfg.early_stop && fooled[i])).collect();
        if active.is_empty() {
            break;
        }
        let p = p_at(cfg.p_init, it, cfg.queries);
        let side = ((p * (h * w) as f64).sqrt().round() as usize)
            .clamp(1, h.min(w).saturating_sub(1).max(1));
        let mut candidate = delta.select(Axis(0), &active);
        for mut d in candidate.outer_iter_mut() {
            let (r0, c0) = (below(&mut rng, h - side + 1), below(&mut rng, w - side + 1));
            let mut win = d.slice_mut(s![.., r0..r0 + side, c0..c0 + side]);
            match cfg.threat.norm {
                Norm::Linf => {
                    for mut chan in win.outer_iter_mut() {
                        chan.fill(sign(&mut rng) * eps);
                    }
                }
                Norm::L2 => {
                    // A centred bump (1 at the centre, falling off linearly), random sign per
                    // channel, carrying a quarter of the budget before projection.
                    let centre = (side as f32 - 1.0) / 2.0;
                    let bump = |r: usize, q: usize| {
                        let dr = (r as f32 - centre).abs();
                        let dq = (q as f32 - centre).abs();
                        1.0 / (1.0 + dr.max(dq))
                    };
                    let norm = (0..side)
                        .flat_map(|r| (0..side).map(move |q| (r, q)))
                        .map(|(r, q)| bump(r, q).powi(2))
                        .sum::<f32>()
                        .sqrt()
                        * (c as f32).sqrt();
                    for mut chan in win.outer_iter_mut() {
                        let sg = sign(&mut rng);
                        for ((r, q), v) in chan.indexed_iter_mut() {
                            *v = sg * bump(r, q) / norm * eps * 0.5;
                        }
                    }
                }
            }
        }
        let x_act = images.select(Axis(0), &active);
        project(x_act.view(), &mut candidate, &cfg.threat);
        let scores = model.scores((&x_act + &candidate).view(), query_id)?;
        query_id += 1;
        for (k, &i) in active.iter().enumerate() {
            queries[i] += 1;
            let m = margin(scores.row(k), labels[i]);
            if m < best[i] {
                best[i] = m;
                delta.slice_mut(s![i, .., .., ..]).assign(&candidate.slice(s![k, .., .., ..]));
                fooled[i] = m < 0.0;
            }
        }
    }
    Ok(SquareOutcome { adversarial: &images + &delta, queries, fooled, margin: best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_schedule_halves_at_the_papers_points() {
        assert_eq!(p_at(0.05, 0, 10_000), 0.05);
        assert_eq!(p_at(0.05, 11, 10_000), 0.025);
        assert_eq!(p_at(0.05, 9_000, 10_000), 0.05 / 512.0);
        // Scaled budgets: 100 queries, iteration 1 is point 100 of 10 000 -> two halvings.
        assert_eq!(p_at(0.05, 1, 100), 0.05 / 4.0);
    }
}
