//! diffshield: diffusion purification ahead of an image classifier (Blau et al. 2022).
//!
//! Data flows one way: frame ([0,1] f32 pixels, NCHW) → [`purify`] (DDIM plan × [`Denoiser`])
//! → [`Classifier`] → [`pipeline::Decision`].
//!
//! The DDIM plan of the paper's CIFAR-10 setting (T* = 140, stride 10, eta 1):
//!
//! ```
//! use diffshield::{DdimPlan, PlanSpec, Schedule};
//!
//! let schedule = Schedule::ddpm_linear_1000();
//! let plan = DdimPlan::new(&schedule, 1..=500, 140, &PlanSpec::Stride(10), 1.0).unwrap();
//! assert_eq!(plan.timesteps().len(), 15); // 140, 130, ..., 10, 0
//! assert!((schedule.abar(140) - 0.8121902060395861).abs() < 1e-12);
//! assert_eq!(plan.steps().last().unwrap().sigma, 0.0); // the last step adds no noise
//! // T* outside the denoiser's trained range is refused.
//! assert!(DdimPlan::new(&schedule, 1..=500, 501, &PlanSpec::Stride(10), 1.0).is_err());
//! ```

pub mod attack;
pub mod backend;
pub mod budget;
pub mod config;
pub mod data;
pub mod error;
pub mod grad;
pub mod manifest;
pub mod noise;
pub mod pipeline;
pub mod purify;
pub mod schedule;
pub mod tune;

pub use backend::{Classifier, Denoiser};
pub use error::{Error, Result};
pub use schedule::{DdimPlan, PlanSpec, Schedule};
pub mod stream;
