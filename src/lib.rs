//! diffshield: diffusion purification ahead of an image classifier (Blau et al. 2022).
//!
//! Data flows one way: frame ([0,1] f32 pixels, NCHW) → [`purify`] (DDIM plan × [`Denoiser`])
//! → [`Classifier`] → [`pipeline::Decision`].

pub mod attack;
pub mod backend;
pub mod budget;
pub mod config;
pub mod data;
pub mod error;
pub mod manifest;
pub mod noise;
pub mod pipeline;
pub mod purify;
pub mod schedule;

pub use backend::{Classifier, Denoiser};
pub use error::{Error, Result};
pub use schedule::{DdimPlan, PlanSpec, Schedule};
pub mod stream;
