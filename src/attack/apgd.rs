//! APGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
//! diverse parameter-free attacks", ICML 2020): PGD with momentum whose step size halves at
//! checkpoints where the loss stopped improving, returning the best point it found. With EOT
//! gradients (BPDA, white-box) the loss it tracks is the mean over the same samples, as
//! AutoAttack's `rand` version does.
//!
//! Per image: step eta starts at 2 eps; x1 = P(x0 + eta * dir(grad)); then
//! z = P(x_k + eta * dir(grad)), x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})) with
//! a = 0.75. At the checkpoints (p_j N with p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
//! 0.06), as AutoAttack's integer steps) eta halves and the iterate restarts from the best point
//! (with its gradient) when at most 75 % of the steps since the last checkpoint raised the loss,
//! or when the step was kept at the last checkpoint and the best loss has not risen since. dir is
//! the sign (Linf) or the unit-norm gradient (L2).

use super::pgd::{project, LossGradient};
use super::{Attack, Norm, Target, ThreatModel};
use crate::error::{Error, Result};
use crate::grad::Loss;
use ndarray::{s, Array4, ArrayView4, Zip};

/// APGD as an [`Attack`] with its own loss (CE or DLR).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Apgd {
    /// Iterations (gradient evaluations after the start), at least 1.
    pub steps: usize,
    /// The loss ascended and tracked: cross-entropy (APGD-CE) or DLR (APGD-DLR).
    pub loss: Loss,
}

/// The checkpoints (iteration indices) of an `n`-iteration run, in AutoAttack's integer form
/// of the schedule: the first after 22 % of the run, each interval 3 % of the run shorter than
/// the last, but at least 6 %.
pub fn checkpoints(n: usize) -> Vec<usize> {
    let first = (n * 22 / 100).max(1);
    let (min, decr) = ((n * 6 / 100).max(1), (n * 3 / 100).max(1));
    let (mut out, mut k, mut interval) = (Vec::new(), first, first);
    while k < n {
        out.push(k);
        interval = interval.saturating_sub(decr).max(min);
        k += interval;
    }
    out
}

impl Attack for Apgd {
    fn craft(
        &self,
        target: &mut Target<'_, '_>,
        images: ArrayView4<f32>,
        labels: &[usize],
        threat: ThreatModel,
    ) -> Result<Array4<f32>> {
        let steps = self.steps;
        target.with_gradient_for(self.loss, |g| apgd(g, images, labels, threat, steps))
    }
}

/// The direction of a step: sign(g) for Linf, g / ||g|| per image for L2.
fn direction(g: &Array4<f32>, norm: Norm) -> Array4<f32> {
    match norm {
        Norm::Linf => g.mapv(|v| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        }),
        Norm::L2 => {
            let mut d = g.clone();
            for mut item in d.outer_iter_mut() {
                let n = item.iter().map(|v| v * v).sum::<f32>().sqrt();
                if n > 0.0 && n.is_finite() {
                    item.mapv_inplace(|v| v / n);
                } else {
                    item.fill(0.0);
                }
            }
            d
        }
    }
}

/// Runs APGD from `images` (\[0,1\] pixels) and returns, per image, the best point found.
pub fn apgd(
    grad: &mut dyn LossGradient,
    images: ArrayView4<f32>,
    labels: &[usize],
    threat: ThreatModel,
    steps: usize,
) -> Result<Array4<f32>> {
    let n = images.shape()[0];
    if labels.len() != n {
        return Err(Error::InvalidConfig(format!("{} labels for {n} images", labels.len())));
    }
    if steps == 0 {
        return Err(Error::InvalidConfig("APGD needs at least 1 step".into()));
    }
    let eps = threat.eps as f32;
    let checks = checkpoints(steps);
    let mut eta = vec![2.0 * eps; n];
    let step = |x: &Array4<f32>, d: &Array4<f32>, eta: &[f32]| {
        let mut z = x.clone();
        for (i, mut item) in z.outer_iter_mut().enumerate() {
            Zip::from(&mut item)
                .and(d.slice(s![i, .., .., ..]))
                .for_each(|v, &di| *v += eta[i] * di);
        }
        project(&mut z, images, threat);
        z
    };
    let mut x_prev = images.to_owned();
    let (f0, g0) = grad.loss_values_and_grad(x_prev.view(), labels, 0)?;
    let mut x = step(&x_prev, &direction(&g0, threat.norm), &eta);
    let (mut f, mut g) = grad.loss_values_and_grad(x.view(), labels, 1)?;
    // The best point, its loss and its gradient (a restart continues from there).
    let (mut best, mut f_best, mut g_best) = (x_prev.clone(), f0.clone(), g0);
    let keep_best = |i: usize,
                     f: &[f32],
                     x: &Array4<f32>,
                     g: &Array4<f32>,
                     best: &mut Array4<f32>,
                     f_best: &mut [f32],
                     g_best: &mut Array4<f32>| {
        if f[i] > f_best[i] {
            f_best[i] = f[i];
            best.slice_mut(s![i, .., .., ..]).assign(&x.slice(s![i, .., .., ..]));
            g_best.slice_mut(s![i, .., .., ..]).assign(&g.slice(s![i, .., .., ..]));
        }
    };
    let mut raised = vec![0usize; n];
    for i in 0..n {
        raised[i] += usize::from(f[i] > f0[i]);
        keep_best(i, &f, &x, &g, &mut best, &mut f_best, &mut g_best);
    }
    let mut last_check = 0usize;
    let mut reduced_last = vec![false; n];
    let mut best_at_check = f_best.clone();
    for k in 1..steps {
        let z = step(&x, &direction(&g, threat.norm), &eta);
        let mut next = x.clone();
        Zip::from(&mut next).and(&z).and(&x).and(&x_prev).for_each(|v, &zv, &xv, &pv| {
            *v = xv + 0.75 * (zv - xv) + 0.25 * (xv - pv);
        });
        project(&mut next, images, threat);
        x_prev = std::mem::replace(&mut x, next);
        let f_prev_iter = std::mem::take(&mut f);
        (f, g) = grad.loss_values_and_grad(x.view(), labels, k + 1)?;
        for i in 0..n {
            raised[i] += usize::from(f[i] > f_prev_iter[i]);
            keep_best(i, &f, &x, &g, &mut best, &mut f_best, &mut g_best);
        }
        if checks.contains(&k) {
            let since = k - last_check;
            for i in 0..n {
                // Too few of the steps since the last checkpoint raised the loss, or the step was
                // kept then and the best loss has not moved since.
                let oscillating = (raised[i] as f64) <= 0.75 * since as f64;
                let stuck = !reduced_last[i] && f_best[i] <= best_at_check[i];
                reduced_last[i] = oscillating || stuck;
                if reduced_last[i] {
                    eta[i] /= 2.0;
                    x.slice_mut(s![i, .., .., ..]).assign(&best.slice(s![i, .., .., ..]));
                    g.slice_mut(s![i, .., .., ..]).assign(&g_best.slice(s![i, .., .., ..]));
                }
                raised[i] = 0;
                best_at_check[i] = f_best[i];
            }
            last_check = k;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loss with a known maximum: per image sum(w * x) with w of mixed signs and sizes, whose
    /// maximiser over the Linf ball and the box is clip(x0 + eps sign(w), 0, 1); for L2 the
    /// direction of w (clipped to the box).
    struct Linear(Array4<f32>);

    impl LossGradient for Linear {
        fn loss_grad(&mut self, x: ArrayView4<f32>, l: &[usize], k: usize) -> Result<Array4<f32>> {
            Ok(self.loss_values_and_grad(x, l, k)?.1)
        }

        fn loss_values_and_grad(
            &mut self,
            x: ArrayView4<f32>,
            _: &[usize],
            _: usize,
        ) -> Result<(Vec<f32>, Array4<f32>)> {
            let values =
                x.outer_iter().zip(self.0.outer_iter()).map(|(a, w)| (&a * &w).sum()).collect();
            Ok((values, self.0.clone()))
        }
    }

    fn setup() -> (Array4<f32>, Array4<f32>) {
        let x = Array4::from_shape_fn((3, 2, 4, 4), |(i, c, h, w)| {
            [0.0, 1.0, 0.5, 0.02, 0.97][(i + c * 3 + h + w * 2) % 5]
        });
        let w = Array4::from_shape_fn((3, 2, 4, 4), |(i, c, h, w)| {
            let v = ((i * 7 + c * 5 + h * 3 + w) % 11) as f32 - 5.0;
            if v == 0.0 {
                0.5
            } else {
                v * 10f32.powi((h % 3) as i32 - 1)
            }
        });
        (x, w)
    }

    #[test]
    fn reaches_the_known_optimum_and_returns_its_best_point() {
        let (x, w) = setup();
        let threat: ThreatModel = "linf:8/255".parse().unwrap();
        let eps = threat.eps as f32;
        let adv = apgd(&mut Linear(w.clone()), x.view(), &[0, 1, 2], threat, 30).unwrap();
        let want =
            Zip::from(&x).and(&w).map_collect(|&x0, &wi| (x0 + eps * wi.signum()).clamp(0.0, 1.0));
        let gap = Zip::from(&adv).and(&want).fold(0.0f32, |m, &a, &b| m.max((a - b).abs()));
        assert!(gap < 1e-5, "APGD ended {gap} from the Linf optimum");
        // L2: the loss can only reach the ball's boundary along w; it must not lose to one PGD-like step.
        let threat: ThreatModel = "l2:0.5".parse().unwrap();
        let adv = apgd(&mut Linear(w.clone()), x.view(), &[0, 1, 2], threat, 30).unwrap();
        for ((a, c), wi) in adv.outer_iter().zip(x.outer_iter()).zip(w.outer_iter()) {
            let d: f32 = (&a - &c).iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(d <= 0.5 + 1e-4, "left the ball: {d}");
            let gain = ((&a - &c) * wi).sum();
            assert!(gain > 0.0, "no progress on L2");
        }
    }

    #[test]
    fn refuses_mismatched_labels_and_zero_steps() {
        let (x, w) = setup();
        let threat: ThreatModel = "linf:8/255".parse().unwrap();
        assert!(apgd(&mut Linear(w.clone()), x.view(), &[0], threat, 5).is_err());
        assert!(apgd(&mut Linear(w), x.view(), &[0, 1, 2], threat, 0).is_err());
    }

    #[test]
    fn checkpoints_follow_the_papers_schedule() {
        // p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of 100 iterations.
        assert_eq!(checkpoints(100), vec![22, 41, 57, 70, 80, 87, 93, 99]);
        assert_eq!(checkpoints(10), vec![2, 3, 4, 5, 6, 7, 8, 9]);
    }
}
