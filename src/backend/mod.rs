//! The narrow interfaces the purifier and the pipeline run on. They never learn which engine
//! (tract on the CPU, CUDA, an analytic test model) is behind them.

pub mod attention;
pub mod direct_conv;
pub mod quant_conv;
pub mod tract;
mod tract_attention;
mod tract_direct;
mod tract_groupnorm;
pub mod tract_opt;
mod tract_quant;

use crate::error::Result;
use ndarray::{Array2, Array4, ArrayView4};

/// An eps-prediction diffusion model.
pub trait Denoiser {
    /// Predicted noise eps for `x_t` (NCHW f32, diffusion space [-1,1] plus noise) at integer
    /// timestep `t` (1-based count of noising steps, the same for every item of the batch).
    /// Returns an array of the same shape as `x_t`.
    fn predict_eps(&mut self, x_t: ArrayView4<f32>, t: u32) -> Result<Array4<f32>>;
}

/// An image classifier.
pub trait Classifier {
    /// Logits (N x classes, f32) of `images` (NCHW f32, RGB pixels in [0,1]).
    fn logits(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>>;
}

impl<D: Denoiser + ?Sized> Denoiser for Box<D> {
    fn predict_eps(&mut self, x_t: ArrayView4<f32>, t: u32) -> Result<Array4<f32>> {
        (**self).predict_eps(x_t, t)
    }
}

impl<C: Classifier + ?Sized> Classifier for Box<C> {
    fn logits(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        (**self).logits(images)
    }
}

use crate::config::{BackendKind, DefenseConfig};
use crate::manifest::Manifest;

/// Loads the denoiser tier and the classifier of `manifest` on the backend `config` names.
pub fn load(
    manifest: &Manifest,
    config: &DefenseConfig,
) -> Result<(Box<dyn Denoiser>, Box<dyn Classifier>)> {
    match config.backend {
        BackendKind::Cpu => {
            tract::set_threads(config.threads)?;
            let d = tract::TractDenoiser::load_with(manifest, &config.denoiser, config.precision)?;
            let c = tract::TractClassifier::load_with(manifest, config.precision)?;
            Ok((Box::new(d), Box::new(c)))
        }
        BackendKind::Cuda => Err(crate::error::Error::BackendUnavailable(
            "this build has no CUDA backend yet; use --backend cpu".into(),
        )),
    }
}
