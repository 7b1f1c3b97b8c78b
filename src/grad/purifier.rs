//! The exact gradient of a classification loss through the whole purifier:
//! image -> noising to x_{T*} -> every DDIM step (denoiser call, clipped x0, fresh noise) ->
//! purified image -> classifier -> loss.
//!
//! The forward pass is the runtime's own [`Purification`] run on the differentiable twin, with
//! the caller's noise source. It keeps x_t and eps of every step (a few KB per image and step)
//! instead of the autodiff graphs, so memory stays bounded by one denoiser graph: the backward
//! pass redoes one step at a time with autodiff, replaying the same noise draws, and checks that
//! the recomputed eps and next state equal the stored ones before using them.

use super::{DifferentiableClassifier, DifferentiableDenoiser, Loss};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::purify::Purification;
use crate::schedule::DdimPlan;
use ndarray::{Array4, ArrayView4, Zip};

/// A loss, its input gradient and what the forward pass produced.
#[derive(Debug, Clone)]
pub struct PurifiedGradient {
    /// Per-image loss of the purified images.
    pub loss: Vec<f32>,
    /// Gradient of the summed loss with respect to the input images ([0,1] pixel units).
    pub grad: Array4<f32>,
    /// The purified images ([0,1] pixels) the classifier saw.
    pub purified: Array4<f32>,
    /// Largest absolute difference between a recomputed value (eps or next state) and the
    /// stored forward value, over all steps. Exact replay gives 0.
    pub replay_error: f32,
}

/// Largest replay error accepted before the gradient is refused: the twin must be
/// deterministic, so anything above float noise means the noise or the plan was not replayed.
const REPLAY_TOLERANCE: f32 = 1e-5;

/// Loss of `classifier(purify(images))` and its exact gradient with respect to `images`.
///
/// `noise` must return the same values for the same (draw, item) on every call (the runtime's
/// [`crate::noise::SeededNoise`] and [`crate::noise::FixedNoise`] do): the backward pass replays
/// it.
pub fn purified_loss_grad(
    plan: &DdimPlan,
    denoiser: &mut dyn DifferentiableDenoiser,
    classifier: &mut dyn DifferentiableClassifier,
    images: ArrayView4<f32>,
    labels: &[usize],
    loss: Loss,
    noise: &mut dyn NoiseSource,
) -> Result<PurifiedGradient> {
    // Forward, keeping x_t and eps per step.
    let mut run = Purification::start(plan, images, noise)?;
    let mut states = Vec::with_capacity(plan.steps().len() + 1);
    let mut eps = Vec::with_capacity(plan.steps().len());
    states.push(run.state().to_owned());
    while run.step(denoiser, noise)?.is_some() {
        states.push(run.state().to_owned());
        eps.push(
            run.last_eps()
                .map(|e| e.to_owned())
                .ok_or_else(|| Error::Backend("purification step produced no eps".into()))?,
        );
    }
    let x0 = states.last().cloned().ok_or_else(|| Error::Backend("no final state".into()))?;
    let purified = x0.mapv(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0));

    // Classifier and loss at the purified images.
    let mut values = Vec::new();
    let (_, g_pixels) = classifier.logits_vjp(purified.view(), &mut |logits| {
        let (v, g) = loss.value_and_grad(logits, labels)?;
        values = v;
        Ok(g)
    })?;
    // pixels = clamp((x0 + 1) / 2, 0, 1); the clamp passes the gradient on [0,1] inclusive.
    let mut g_x = Zip::from(&g_pixels).and(&x0).map_collect(|&g, &x| {
        if (-1.0..=1.0).contains(&x) {
            0.5 * g
        } else {
            0.0
        }
    });

    // Backward through the steps, last first, one recomputed denoiser call at a time.
    let per_item: usize = images.shape()[1..].iter().product();
    let mut z = vec![0.0f32; per_item];
    let mut replay_error = 0.0f32;
    for (k, c) in plan.steps().iter().enumerate().rev() {
        let (x_t, eps_k, x_s) = (&states[k], &eps[k], &states[k + 1]);
        let (sa_t, s1m_t) = (c.sqrt_abar_t as f32, c.sqrt_one_minus_abar_t as f32);
        let (sa_s, dir, sigma) = (c.sqrt_abar_s as f32, c.dir_coeff as f32, c.sigma as f32);

        // Cotangents of eps and of x_t's direct path, from the stored forward values.
        let mut g_eps = Array4::<f32>::zeros(x_t.raw_dim());
        let mut g_xt = Array4::<f32>::zeros(x_t.raw_dim());
        Zip::from(&mut g_eps).and(&mut g_xt).and(&g_x).and(x_t).and(eps_k).for_each(
            |ge, gx, &g, &x, &e| {
                let pre = (x - s1m_t * e) / sa_t;
                let g_pre = if (-1.0..=1.0).contains(&pre) { sa_s * g } else { 0.0 };
                *gx = g_pre / sa_t;
                *ge = dir * g - s1m_t / sa_t * g_pre;
            },
        );
        let (eps_again, g_through_eps) = denoiser.eps_vjp(x_t.view(), c.t, g_eps.view())?;
        replay_error = replay_error.max(max_abs_diff(eps_again.view(), eps_k.view()));

        // The next state rebuilt from the recomputed eps and the replayed noise must be the one
        // the forward pass stored.
        let mut x_next = Array4::<f32>::zeros(x_t.raw_dim());
        Zip::from(&mut x_next).and(x_t).and(&eps_again).for_each(|xn, &x, &e| {
            let est = ((x - s1m_t * e) / sa_t).clamp(-1.0, 1.0);
            *xn = sa_s * est + dir * e;
        });
        if sigma > 0.0 {
            for (i, mut item) in x_next.outer_iter_mut().enumerate() {
                noise.fill(k + 1, i, &mut z);
                item.iter_mut().zip(&z).for_each(|(v, zi)| *v += sigma * zi);
            }
        }
        replay_error = replay_error.max(max_abs_diff(x_next.view(), x_s.view()));
        if replay_error > REPLAY_TOLERANCE {
            return Err(Error::Backend(format!(
                "purifier gradient: recomputed step {} (t={}) differs from the forward pass by \
                 {replay_error:e}; the noise source or the twin is not deterministic",
                k + 1,
                c.t
            )));
        }
        g_x = g_xt + g_through_eps;
    }
    // x_{T*} = a * (2 * image - 1) + b * z.
    let (a, _) = plan.start_coeffs();
    let grad = g_x.mapv(|g| 2.0 * a as f32 * g);
    Ok(PurifiedGradient { loss: values, grad, purified, replay_error })
}

fn max_abs_diff(a: ArrayView4<f32>, b: ArrayView4<f32>) -> f32 {
    Zip::from(a).and(b).fold(0.0f32, |m, &x, &y| m.max((x - y).abs()))
}
