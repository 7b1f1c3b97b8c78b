//! diffshield: diffusion purification ahead of an image classifier (Blau, Ganz, Kawar,
//! Bronstein, Elad 2022). Every frame is noised to diffusion step T*, brought back by a short
//! DDIM sampler with fresh noise at every step, then classified; both networks saw clean images
//! only, so the defence assumes no particular attack.
//!
//! # Embedding
//!
//! Build a [`Defense`] once and hand it frames of any size; it finds the models (the
//! `DIFFSHIELD_MODELS` variable, else the models this library was built with, else
//! [`DefenseBuilder::models`]), fits each frame to the models' input, numbers the frames and
//! draws its noise seed from the operating system:
//!
//! ```
//! use diffshield::{Defense, Image};
//!
//! let mut defense = Defense::builder().denoiser("s").votes(3).build()?;
//! assert_eq!(defense.input_size(), (32, 32));
//!
//! // A 64x48 RGB8 frame, as a camera delivers it (row-major, R G B per pixel).
//! let (w, h) = (64u32, 48u32);
//! let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
//! let decision = defense.classify(Image::rgb8(w, h, &pixels))?;
//!
//! if let Some(label) = decision.label {
//!     println!("{} ({}), {:.0} % of the votes", decision.class, label,
//!              100.0 * decision.confidence.vote_share);
//! }
//! assert_eq!(decision.vote_labels.len(), 3);
//! assert_eq!(decision.frame, 0);
//! // The seed (and the frame index) replay the decision exactly.
//! let mut replay = Defense::builder().denoiser("s").votes(3).seed(decision.seed).build()?;
//! let again = replay.classify(Image::rgb8(w, h, &pixels))?;
//! assert_eq!((again.label, &again.probs), (decision.label, &decision.probs));
//! # Ok::<(), diffshield::Error>(())
//! ```
//!
//! A latency budget (`.budget_ms(50.0)`) plans steps and votes per frame from costs measured
//! when the defence is built; `.min_confidence(0.5)` answers "unknown" below that mean
//! probability. [`Defense::run_stream`] classifies a paced stream from a [`stream::FrameSource`]
//! and [`Defense::accuracy`] measures labelled data. `Defense` is `Send`.
//!
//! # Layers
//!
//! Data flows one way: frame (\[0,1\] f32 pixels, NCHW) → [`purify`] (a [`DdimPlan`] over a
//! [`Denoiser`]) → [`Classifier`] → [`Decision`]. [`pipeline::Pipeline`] is that chain with
//! explicit frame indices and noise domains ([`noise`]), which the attack harness
//! ([`attack`]) and the tuning sweep (`tune`, feature `tune`) drive. The backends implement
//! [`Denoiser`] and [`Classifier`] (tract on the CPU: [`backend::tract`]); the differentiable
//! twins for white-box attacks are in [`grad`] (feature `twin`).
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
//!
//! # Features
//!
//! - `cli` (default): the `diffshield` binary (clap, indicatif, anyhow, env_logger) and `tune`.
//! - `tune` (with `cli`): the configuration sweep and its SVG plots (plotters).
//! - `twin` (default): differentiable twins of the shipped networks on burn, for white-box
//!   attacks (about ten minutes of compilation).
//!
//! `diffshield = { version = "0.1", default-features = false }` is the runtime alone.

// Every public item says what it holds (units included) to the camera apps that embed it; the
// lint keeps it so under `cargo clippy -- -D warnings`.
#![warn(missing_docs)]

pub mod attack;
pub mod backend;
pub mod budget;
pub mod config;
pub mod data;
pub(crate) mod ddim;
pub mod decision;
pub mod defense;
pub mod device_check;
pub mod error;
pub(crate) mod files;
// Keys tune's cache and checks the twins against their models.
#[cfg(any(feature = "tune", feature = "twin"))]
pub(crate) mod fingerprint;
pub mod grad;
pub mod input;
pub mod manifest;
pub mod memory;
pub mod noise;
pub mod pipeline;
pub mod purified_set;
pub mod purify;
pub mod schedule;
pub(crate) mod stats;
pub mod stream;
#[cfg(test)]
pub(crate) mod test_skip;
#[cfg(feature = "tune")]
pub mod tune;

pub use backend::{Classifier, Denoiser};
pub use config::{DefenseConfig, Precision, VoteRule};
pub use decision::{ClassScore, Confidence, Decision};
pub use defense::{Defense, DefenseBuilder};
pub use error::{Error, Result};
pub use input::Image;
/// The array crate of the API (`ndarray` 0.17), so an embedder needs no version of its own.
pub use ndarray;
pub use schedule::{DdimPlan, PlanSpec, Schedule};
