//! The narrow interfaces the purifier and the pipeline run on. They never learn which engine
//! (tract on the CPU, CUDA, an analytic test model) is behind them.

pub(crate) mod attention;
pub(crate) mod attention_bf16;
pub(crate) mod conv_kernel;
mod cuda;
pub(crate) mod direct_conv;
#[cfg(test)]
mod own_kernels_tests;
pub(crate) mod par;
pub(crate) mod quant_conv;
mod quant_winograd;
pub(crate) mod simd;
mod switches;
pub mod tract;
mod tract_attention;
mod tract_concat;
mod tract_direct;
mod tract_groupnorm;
mod tract_kernel_op;
mod tract_match;
pub(crate) mod tract_opt;
mod tract_quant;
mod tract_upsample;
mod winograd;

pub use simd::{cpu_name, KernelLevel, KERNELS_ENV};

use crate::error::Result;
use ndarray::{Array2, Array4, ArrayView4};

/// An eps-prediction diffusion model. `Send`, so a pipeline (and a [`crate::Defense`]) can move
/// to a worker thread.
pub trait Denoiser: Send {
    /// Predicted noise eps for `x_t` (NCHW f32, diffusion space \[-1,1\] plus noise) at integer
    /// timestep `t` (1-based count of noising steps, the same for every item of the batch).
    /// Returns an array of the same shape as `x_t`.
    fn predict_eps(&mut self, x_t: ArrayView4<f32>, t: u32) -> Result<Array4<f32>>;
}

/// An image classifier. `Send`, like [`Denoiser`].
pub trait Classifier: Send {
    /// Logits (N x classes, f32) of `images` (NCHW f32, RGB pixels in \[0,1\]).
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

use crate::config::{BackendKind, DefenseConfig, Precision};
use crate::manifest::{ClassifierRole, Manifest};
use tract::Engine;

/// The engine `config` asks for: `cpu`; `cuda` (an error naming tract-cuda's reason where no
/// usable GPU or CUDA library is found, or where this build has no CUDA backend); `auto` (CUDA
/// when usable, else the CPU; the choice is logged).
pub fn engine(config: &DefenseConfig) -> Result<Engine> {
    let cpu = || Ok(Engine::Cpu(tract::CpuThreads::new(config.threads)?));
    let engine = match config.backend {
        BackendKind::Cpu => cpu()?,
        BackendKind::Cuda => Engine::Runtime(cuda::runtime()?),
        BackendKind::Auto => match cuda::runtime() {
            Ok(rt) => {
                log::info!("backend auto: CUDA");
                Engine::Runtime(rt)
            }
            Err(e) => {
                log::info!("backend auto: the CPU ({e})");
                cpu()?
            }
        },
    };
    if matches!(engine, Engine::Runtime(_)) && config.precision == Precision::Int8 {
        return Err(crate::error::Error::InvalidConfig(
            "precision int8 is a CPU mode (our VNNI kernels); use f32 with --backend cuda".into(),
        ));
    }
    Ok(engine)
}

/// The networks of a pipeline.
pub struct Models {
    /// The configured denoiser tier.
    pub denoiser: Box<dyn Denoiser>,
    /// The classifier after the purifier ([`ClassifierRole::Defended`]).
    pub classifier: Box<dyn Classifier>,
    /// The undefended mode's classifier where it is another file; `None`: `classifier`.
    pub bare_classifier: Option<Box<dyn Classifier>>,
}

/// Sets `config.precision` to what runs on this CPU: `int8` only where this crate's int8
/// convolution runs (AVX-512 VNNI) or tract's own ops were asked for (`DIFFSHIELD_KERNELS=tract`);
/// elsewhere `f32`, with a warning, since tract's int8 ops measured 5.6-6x slower than our f32
/// kernels there (AVX2 forced, benches/compare_int8.py). Every job resolves its configuration
/// through this before it names its files, so reports fingerprint the models that ran.
pub fn resolve_precision(config: &mut DefenseConfig) {
    if config.precision != Precision::Int8 {
        return;
    }
    let forced_tract = std::env::var(simd::KERNELS_ENV).is_ok_and(|v| v.trim() == "tract")
        || !tract_opt::own_kernels_enabled();
    let ours = KernelLevel::from_env().is_ok_and(quant_conv::QuantConv::available);
    if !ours && !forced_tract {
        log::warn!(
            "precision int8: this CPU has no AVX-512 VNNI for diffshield's int8 kernels, and \
             tract's own int8 ops are about 6x slower than f32 on such CPUs: running the f32 \
             models (DIFFSHIELD_KERNELS=tract forces tract's int8 ops)"
        );
        config.precision = Precision::F32;
    }
}

/// Loads the denoiser tier and the classifiers of `manifest` on the engine `config` names
/// (at the precision [`resolve_precision`] gives).
pub fn load(manifest: &Manifest, config: &DefenseConfig) -> Result<Models> {
    let mut config = config.clone();
    resolve_precision(&mut config);
    let config = &config;
    let engine = engine(config)?;
    let d = tract::TractDenoiser::load_on(manifest, &config.denoiser, config.precision, &engine)?;
    let c = tract::TractClassifier::load_role(
        manifest,
        ClassifierRole::Defended,
        config.precision,
        &engine,
    )?;
    let bare = match manifest.has_defended_classifier() {
        true => {
            Some(Box::new(tract::TractClassifier::load_on(manifest, config.precision, &engine)?)
                as Box<dyn Classifier>)
        }
        false => None,
    };
    Ok(Models { denoiser: Box::new(d), classifier: Box::new(c), bare_classifier: bare })
}

/// Deterministic test inputs for the kernels' unit tests.
#[cfg(test)]
mod test_values {
    /// `n` values in \[-1, 1\] on a 1e-4 grid from a xorshift stream keyed by `seed`.
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// Plain f64 convolution of one `ci x h x w` image `x` with OIHW weights `wt` (`co x ci x
    /// k x k`), zero padding k / 2, stride 1, plus `bias`: `co x h x w` values.
    pub fn reference_conv(
        x: &[f64],
        (ci, h, w): (usize, usize, usize),
        wt: &[f64],
        bias: &[f64],
        (co, k): (usize, usize),
    ) -> Vec<f64> {
        let pad = (k / 2) as isize;
        let mut y = vec![0f64; co * h * w];
        for o in 0..co {
            for r in 0..h {
                for c in 0..w {
                    let mut s = bias[o];
                    for i in 0..ci {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (rr, cc) = ((r + ky) as isize - pad, (c + kx) as isize - pad);
                                if rr < 0 || cc < 0 || rr >= h as isize || cc >= w as isize {
                                    continue;
                                }
                                let xv = x[(i * h + rr as usize) * w + cc as usize];
                                s += xv * wt[((o * ci + i) * k + ky) * k + kx];
                            }
                        }
                    }
                    y[(o * h + r) * w + c] = s;
                }
            }
        }
        y
    }
}
