//! The paper's Algorithm 2: noise the image to T*, then run the reduced DDIM sampler with a
//! fresh noise injection at every step. Images come in and go out as \[0,1\] f32 pixels; the
//! arithmetic of each step and the \[-1,1\] diffusion space live in one crate-private module
//! (`ddim.rs`), shared with the gradient code.
//!
//! [`Purification`] is a step iterator: after every step the current x0 estimate is available,
//! so a caller that runs out of time can stop early and classify the latest estimate.

use crate::backend::Denoiser;
use crate::ddim;
use crate::error::{Error, Result};
use crate::noise::{draw_batch, NoiseSource};
use crate::schedule::DdimPlan;
use ndarray::{Array4, ArrayView4};

/// What one DDIM step did, for logging and anytime use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// 1-based index of the step in the plan.
    pub index: usize,
    /// Timestep the step started from.
    pub t: u32,
    /// Timestep it landed on.
    pub s: u32,
}

/// One purification run over a batch, advanced one DDIM step at a time.
pub struct Purification<'p> {
    plan: &'p DdimPlan,
    /// Current state x_t in diffusion space.
    x: Array4<f32>,
    /// x0 estimate of the last step, in diffusion space (clipped to \[-1,1\]).
    x0_hat: Option<Array4<f32>>,
    /// eps predicted at the last step.
    eps: Option<Array4<f32>>,
    done: usize,
}

/// Checks that `images` is NCHW with every pixel finite and in \[0,1\].
pub fn validate_images(images: ArrayView4<f32>, what: &str) -> Result<()> {
    if let Some((idx, v)) = images.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::Pixels {
            what: what.to_string(),
            reason: format!("non-finite value {v} at image {} (n,c,h,w)={idx:?}", idx.0),
        });
    }
    if let Some((idx, v)) = images.indexed_iter().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
        return Err(Error::Pixels {
            what: what.to_string(),
            reason: format!("value {v} outside [0,1] at (n,c,h,w)={idx:?}"),
        });
    }
    Ok(())
}

impl<'p> Purification<'p> {
    /// Starts a run: maps `images` (\[0,1\] pixels) to x0 = 2*image - 1 and noises it to x_{T*}
    /// with draw 0 of `noise`.
    pub fn start(
        plan: &'p DdimPlan,
        images: ArrayView4<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Self> {
        validate_images(images, "purifier input")?;
        let z = draw_batch(noise, 0, images.raw_dim());
        let x = ddim::noise_to_start(plan.start_coeffs(), images, z.view());
        Ok(Self { plan, x, x0_hat: None, eps: None, done: 0 })
    }

    /// Runs the next DDIM step; `None` once the plan is complete.
    pub fn step(
        &mut self,
        denoiser: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
    ) -> Result<Option<StepInfo>> {
        let Some(c) = self.plan.steps().get(self.done).copied() else {
            return Ok(None);
        };
        let eps = denoiser.predict_eps(self.x.view(), c.t)?;
        if eps.shape() != self.x.shape() {
            return Err(Error::Backend(format!(
                "denoiser returned shape {:?} for input {:?}",
                eps.shape(),
                self.x.shape()
            )));
        }
        if let Some(v) = eps.iter().find(|v| !v.is_finite()) {
            return Err(Error::Backend(format!(
                "the denoiser returned a non-finite eps ({v}) at step {} (t={}): the model or \
                 its backend is broken",
                self.done + 1,
                c.t
            )));
        }
        let z = ddim::needs_noise(&c).then(|| draw_batch(noise, self.done + 1, self.x.raw_dim()));
        let out = ddim::step(&c, self.x.view(), eps.view(), z.as_ref().map(|z| z.view()));
        self.x = out.x_s;
        self.x0_hat = Some(out.x0_hat);
        self.eps = Some(eps);
        self.done += 1;
        Ok(Some(StepInfo { index: self.done, t: c.t, s: c.s }))
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        self.done
    }

    /// True once every step of the plan has run.
    pub fn is_complete(&self) -> bool {
        self.done == self.plan.steps().len()
    }

    /// Current state x_t (diffusion space); x_{T*} before the first step, x_0 at the end.
    pub fn state(&self) -> ArrayView4<'_, f32> {
        self.x.view()
    }

    /// x0 estimate of the last step (diffusion space, clipped to \[-1,1\]).
    pub fn x0_estimate(&self) -> Option<ArrayView4<'_, f32>> {
        self.x0_hat.as_ref().map(|a| a.view())
    }

    /// eps predicted at the last step.
    pub fn last_eps(&self) -> Option<ArrayView4<'_, f32>> {
        self.eps.as_ref().map(|a| a.view())
    }

    /// The best image available now, as \[0,1\] pixels: the final x_0 once complete, otherwise
    /// the latest x0 estimate; `None` before the first step (nothing denoised yet).
    pub fn current_image(&self) -> Option<Array4<f32>> {
        let src = if self.is_complete() { Some(&self.x) } else { self.x0_hat.as_ref() };
        src.map(|x| ddim::to_pixels(x.view()))
    }

    /// Runs the remaining steps and returns the purified images (\[0,1\] pixels).
    pub fn finish(
        mut self,
        denoiser: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
    ) -> Result<Array4<f32>> {
        while self.step(denoiser, noise)?.is_some() {}
        Ok(ddim::to_pixels(self.x.view()))
    }
}

/// Purifies `images` (\[0,1\] pixels, NCHW) with the whole plan; returns \[0,1\] pixels.
pub fn purify(
    plan: &DdimPlan,
    denoiser: &mut dyn Denoiser,
    images: ArrayView4<f32>,
    noise: &mut dyn NoiseSource,
) -> Result<Array4<f32>> {
    Purification::start(plan, images, noise)?.finish(denoiser, noise)
}
