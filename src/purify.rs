//! The paper's Algorithm 2: noise the image to T*, then run the reduced DDIM sampler with a
//! fresh noise injection at every step. The [-1,1] diffusion space lives only in this module;
//! images come in and go out as [0,1] f32 pixels.
//!
//! [`Purification`] is a step iterator: after every step the current x0 estimate is available,
//! so a caller that runs out of time can stop early and classify the latest estimate.

use crate::backend::Denoiser;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::schedule::DdimPlan;
use ndarray::{Array4, ArrayView4, Zip};

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
    /// x0 estimate of the last step, in diffusion space (clipped to [-1,1]).
    x0_hat: Option<Array4<f32>>,
    /// eps predicted at the last step.
    eps: Option<Array4<f32>>,
    done: usize,
    noise_buf: Vec<f32>,
}

/// Checks that `images` is NCHW with every pixel finite and in [0,1].
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
    /// Starts a run: maps `images` ([0,1] pixels) to x0 = 2*image - 1 and noises it to x_{T*}
    /// with draw 0 of `noise`.
    pub fn start(
        plan: &'p DdimPlan,
        images: ArrayView4<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Self> {
        validate_images(images, "purifier input")?;
        let (a, b) = plan.start_coeffs();
        let (a, b) = (a as f32, b as f32);
        let per_item: usize = images.shape()[1..].iter().product();
        let mut noise_buf = vec![0.0f32; per_item];
        let mut x = images.to_owned();
        for (i, mut item) in x.outer_iter_mut().enumerate() {
            noise.fill(0, i, &mut noise_buf);
            for (v, z) in item.iter_mut().zip(&noise_buf) {
                *v = a * (2.0 * *v - 1.0) + b * z;
            }
        }
        Ok(Self { plan, x, x0_hat: None, eps: None, done: 0, noise_buf })
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
        let (sa_t, s1m_t) = (c.sqrt_abar_t as f32, c.sqrt_one_minus_abar_t as f32);
        let (sa_s, dir, sigma) = (c.sqrt_abar_s as f32, c.dir_coeff as f32, c.sigma as f32);
        let mut x0_hat = self.x0_hat.take().unwrap_or_else(|| Array4::zeros(self.x.raw_dim()));
        Zip::from(&mut x0_hat).and(&mut self.x).and(&eps).for_each(|x0, x, &e| {
            let est = ((*x - s1m_t * e) / sa_t).clamp(-1.0, 1.0);
            *x0 = est;
            *x = sa_s * est + dir * e;
        });
        // sigma = 0 (eta = 0, or the last step) consumes no noise, as the golden vectors expect.
        if sigma > 0.0 {
            let draw = self.done + 1;
            for (i, mut item) in self.x.outer_iter_mut().enumerate() {
                noise.fill(draw, i, &mut self.noise_buf);
                for (v, z) in item.iter_mut().zip(&self.noise_buf) {
                    *v += sigma * z;
                }
            }
        }
        self.x0_hat = Some(x0_hat);
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

    /// x0 estimate of the last step (diffusion space, clipped to [-1,1]).
    pub fn x0_estimate(&self) -> Option<ArrayView4<'_, f32>> {
        self.x0_hat.as_ref().map(|a| a.view())
    }

    /// eps predicted at the last step.
    pub fn last_eps(&self) -> Option<ArrayView4<'_, f32>> {
        self.eps.as_ref().map(|a| a.view())
    }

    /// The best image available now, as [0,1] pixels: the final x_0 once complete, otherwise
    /// the latest x0 estimate; `None` before the first step (nothing denoised yet).
    pub fn current_image(&self) -> Option<Array4<f32>> {
        let src = if self.is_complete() { Some(&self.x) } else { self.x0_hat.as_ref() };
        src.map(to_pixels)
    }

    /// Runs the remaining steps and returns the purified images ([0,1] pixels).
    pub fn finish(
        mut self,
        denoiser: &mut dyn Denoiser,
        noise: &mut dyn NoiseSource,
    ) -> Result<Array4<f32>> {
        while self.step(denoiser, noise)?.is_some() {}
        Ok(to_pixels(&self.x))
    }
}

/// Purifies `images` ([0,1] pixels, NCHW) with the whole plan; returns [0,1] pixels.
pub fn purify(
    plan: &DdimPlan,
    denoiser: &mut dyn Denoiser,
    images: ArrayView4<f32>,
    noise: &mut dyn NoiseSource,
) -> Result<Array4<f32>> {
    Purification::start(plan, images, noise)?.finish(denoiser, noise)
}

/// Diffusion space to pixels: clip((x + 1) / 2, 0, 1).
fn to_pixels(x: &Array4<f32>) -> Array4<f32> {
    x.mapv(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
}
