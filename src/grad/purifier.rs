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
use crate::ddim;
use crate::error::{Error, Result};
use crate::noise::{draw_batch, NoiseSource};
use crate::purify::Purification;
use crate::schedule::DdimPlan;
use ndarray::{Array4, ArrayView4, Zip};

/// A loss, its input gradient and what the forward pass produced.
#[derive(Debug, Clone)]
pub struct PurifiedGradient {
    /// Per-image loss of the purified images.
    pub loss: Vec<f32>,
    /// Gradient of the summed loss with respect to the input images (\[0,1\] pixel units).
    pub grad: Array4<f32>,
    /// The purified images (\[0,1\] pixels) the classifier saw.
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
    let purified = ddim::to_pixels(x0.view());

    // Classifier and loss at the purified images.
    let mut values = Vec::new();
    let (_, g_pixels) = classifier.logits_vjp(purified.view(), &mut |logits| {
        let (v, g) = loss.value_and_grad(logits, labels)?;
        values = v;
        Ok(g)
    })?;
    let mut g_x = ddim::to_pixels_vjp(x0.view(), g_pixels.view());

    // Backward through the steps, last first, one recomputed denoiser call at a time.
    let mut replay_error = 0.0f32;
    for (k, c) in plan.steps().iter().enumerate().rev() {
        let (x_t, eps_k, x_s) = (&states[k], &eps[k], &states[k + 1]);
        // Cotangents of eps and of x_t's direct path, from the stored forward values.
        let (g_xt, g_eps) = ddim::step_vjp(c, x_t.view(), eps_k.view(), g_x.view());
        let (eps_again, g_through_eps) = denoiser.eps_vjp(x_t.view(), c.t, g_eps.view())?;
        replay_error = replay_error.max(max_abs_diff(eps_again.view(), eps_k.view()));

        // The next state rebuilt from the recomputed eps and the replayed noise must be the one
        // the forward pass stored.
        let z = ddim::needs_noise(c).then(|| draw_batch(noise, k + 1, x_t.raw_dim()));
        let again = ddim::step(c, x_t.view(), eps_again.view(), z.as_ref().map(|z| z.view()));
        replay_error = replay_error.max(max_abs_diff(again.x_s.view(), x_s.view()));
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
    let grad = ddim::noise_to_start_vjp(plan.start_coeffs(), g_x.view());
    Ok(PurifiedGradient { loss: values, grad, purified, replay_error })
}

fn max_abs_diff(a: ArrayView4<f32>, b: ArrayView4<f32>) -> f32 {
    Zip::from(a).and(b).fold(0.0f32, |m, &x, &y| m.max((x - y).abs()))
}
