//! CPU inference on tract: float32, or the int8 (QOperator) models with `precision = "int8"`.
//!
//! A model is parsed and decluttered once with its symbolic batch dimension; each batch size
//! actually used (up to [`MAX_PLAN_BATCH`]; larger batches run in chunks) gets its own
//! optimized plan (the batch fixed before codegen, so tract can pick kernels for the real
//! shapes), built on first use and cached with a reusable session state.

use super::{Classifier, Denoiser};
use crate::config::Precision;
use crate::error::{Error, Result};
use crate::manifest::{ClassifierEntry, DenoiserEntry, Manifest};
use ndarray::{Array2, Array4, ArrayD, ArrayView4, Axis, Ix2, Ix4};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

/// Sets the number of threads tract's matrix kernels use (process-wide). 1 keeps everything on
/// the calling thread; n > 1 starts a rayon pool of n threads for the large matrix products.
pub fn set_threads(threads: usize) -> Result<()> {
    use tract_linalg::multithread::{set_default_executor, Executor};
    if threads == 0 {
        return Err(Error::InvalidConfig("threads must be at least 1".into()));
    }
    set_default_executor(if threads == 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(threads)
    });
    Ok(())
}

/// Largest batch one tract plan runs; larger batches run in chunks. This bounds the plan cache
/// to this many plans (an attack's shrinking active set would otherwise build one per size),
/// and the per-sample conv split of `tract_opt` makes bigger plans slower to build and no
/// faster to run.
pub const MAX_PLAN_BATCH: usize = 8;

/// A loaded ONNX model with per-batch-size plans.
struct BatchedModel {
    path: PathBuf,
    base: TypedModel,
    batch: Symbol,
    states: HashMap<usize, TypedSimpleState>,
}

impl BatchedModel {
    /// Loads `path` and checks it against the manifest: input names in order, each input's shape
    /// `[batch, rest...]` (the batch dimension must be symbolic) and the output name and shape.
    fn load(
        path: &Path,
        inputs: &[(&str, Vec<usize>)],
        output: (&str, Vec<usize>),
    ) -> Result<Self> {
        let load_err = |reason: String| Error::ModelLoad { path: path.to_path_buf(), reason };
        let mismatch =
            |reason: String| Error::ManifestMismatch { path: path.to_path_buf(), reason };
        if !path.is_file() {
            return Err(load_err("file not found".into()));
        }
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| load_err(format!("not a valid ONNX model ({e})")))?;
        let names: Vec<String> = model
            .input_outlets()
            .map_err(|e| load_err(e.to_string()))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let expected: Vec<&str> = inputs.iter().map(|(n, _)| *n).collect();
        if names != expected {
            return Err(mismatch(format!("inputs are {names:?}, manifest says {expected:?}")));
        }
        let out_outlet = model.output_outlets().map_err(|e| load_err(e.to_string()))?;
        let out_names: Vec<String> = out_outlet
            .iter()
            .map(|o| model.outlet_label(*o).unwrap_or(&model.node(o.node).name).to_string())
            .collect();
        if out_names != [output.0] {
            return Err(mismatch(format!(
                "outputs are {out_names:?}, manifest says [{:?}]",
                output.0
            )));
        }
        let typed = model
            .into_typed()
            .and_then(|m| super::tract_opt::prepare(m, super::tract_opt::own_kernels_enabled()))
            .map_err(|e| mismatch(format!("shape analysis failed ({e})")))?;
        let mut batch = None;
        for (ix, (name, rest)) in inputs.iter().enumerate() {
            let fact = typed.input_fact(ix).map_err(|e| load_err(e.to_string()))?;
            let dims: Vec<TDim> = fact.shape.iter().cloned().collect();
            let ok_rest = dims.len() == rest.len() + 1
                && dims[1..].iter().zip(rest).all(|(d, r)| d.to_i64().ok() == Some(*r as i64));
            match (&dims.first(), ok_rest) {
                (Some(TDim::Sym(s)), true) if batch.as_ref().is_none_or(|b| b == s) => {
                    batch = Some(s.clone())
                }
                _ => {
                    return Err(mismatch(format!(
                        "input {name} has shape {dims:?}, manifest says [batch, {rest:?}] with a symbolic batch"
                    )))
                }
            }
        }
        let batch = batch.ok_or_else(|| mismatch("model has no inputs".into()))?;
        let out_fact = typed
            .output_fact(0)
            .map_err(|e| load_err(e.to_string()))?
            .shape
            .iter()
            .cloned()
            .collect::<Vec<TDim>>();
        let want_out: Vec<TDim> = std::iter::once(TDim::Sym(batch.clone()))
            .chain(output.1.iter().map(|&d| TDim::from(d as i64)))
            .collect();
        if out_fact != want_out {
            return Err(mismatch(format!(
                "output {} has shape {out_fact:?}, manifest says {want_out:?}",
                output.0
            )));
        }
        Ok(Self { path: path.to_path_buf(), base: typed, batch, states: HashMap::new() })
    }

    /// Runs `x` (plus, for a denoiser, the timestep `t` for every item) in chunks of at most
    /// [`MAX_PLAN_BATCH`] images and concatenates the first output along the batch axis.
    fn run_chunked(&mut self, x: ArrayView4<f32>, t: Option<f32>) -> Result<ArrayD<f32>> {
        let mut parts = Vec::new();
        for chunk in x.axis_chunks_iter(Axis(0), MAX_PLAN_BATCH) {
            let n = chunk.shape()[0];
            let mut inputs = tvec![to_tensor(chunk)];
            if let Some(t) = t {
                inputs.push(tract_ndarray::Array1::from_elem(n, t).into_tensor().into_tvalue());
            }
            let out = self.run(inputs, n)?;
            let view = out[0]
                .to_plain_array_view::<f32>()
                .map_err(|e| Error::Backend(format!("{}: output: {e}", self.path.display())))?;
            parts.push(view.to_owned());
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| Error::Backend(e.to_string()))
    }

    fn run(&mut self, inputs: TVec<TValue>, n: usize) -> Result<TVec<TValue>> {
        let backend = |e: TractError| Error::Backend(format!("{}: {e:#}", self.path.display()));
        if !self.states.contains_key(&n) {
            log::debug!("building tract plan for {} at batch {n}", self.path.display());
            let subs = HashMap::from([(self.batch.clone(), TDim::from(n as i64))]);
            let state = self
                .base
                .set_symbols(&subs)
                .and_then(super::tract_opt::optimise)
                .and_then(|m| m.into_runnable())
                .and_then(|p| p.spawn())
                .map_err(backend)?;
            self.states.insert(n, state);
        }
        let state = self.states.get_mut(&n).expect("inserted above");
        state.run(inputs).map_err(|e| Error::Backend(format!("{e:#}")))
    }
}

fn check_batch(x: &ArrayView4<f32>, rest: [usize; 3], what: &str) -> Result<()> {
    if x.shape()[1..] != rest {
        return Err(Error::Shape {
            expected: format!("{what} [N, {}, {}, {}]", rest[0], rest[1], rest[2]),
            got: format!("{:?}", x.shape()),
        });
    }
    Ok(())
}

fn to_tensor(x: ArrayView4<f32>) -> TValue {
    x.to_owned().into_dyn().into_tensor().into_tvalue()
}

/// The classifier on tract.
pub struct TractClassifier {
    model: BatchedModel,
    entry: ClassifierEntry,
}

impl TractClassifier {
    /// Loads the manifest's float32 classifier.
    pub fn load(manifest: &Manifest) -> Result<Self> {
        Self::load_with(manifest, Precision::F32)
    }

    /// Loads the manifest's classifier at `precision` (`int8_file` for int8).
    pub fn load_with(manifest: &Manifest, precision: Precision) -> Result<Self> {
        let e = manifest.classifier.clone();
        let path = manifest.file_at("classifier", &e.file, e.int8_file.as_deref(), precision)?;
        let model = BatchedModel::load(
            &path,
            &[(e.input.as_str(), e.input_shape.to_vec())],
            (e.output.as_str(), vec![e.classes.len()]),
        )?;
        Ok(Self { model, entry: e })
    }
}

impl Classifier for TractClassifier {
    fn logits(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        check_batch(&images, self.entry.input_shape, "classifier input")?;
        let out = self.model.run_chunked(images, None)?;
        out.into_dimensionality::<Ix2>()
            .map_err(|e| Error::Backend(format!("classifier output: {e}")))
    }
}

/// An eps-prediction denoiser on tract.
pub struct TractDenoiser {
    model: BatchedModel,
    entry: DenoiserEntry,
}

impl TractDenoiser {
    /// Loads the manifest's float32 denoiser of tier `name` ("m", "s").
    pub fn load(manifest: &Manifest, name: &str) -> Result<Self> {
        Self::load_with(manifest, name, Precision::F32)
    }

    /// Loads the denoiser of tier `name` at `precision` (`int8_file` for int8).
    pub fn load_with(manifest: &Manifest, name: &str, precision: Precision) -> Result<Self> {
        let e = manifest.denoiser(name)?.clone();
        let what = format!("denoiser {name}");
        let path = manifest.file_at(&what, &e.file, e.int8_file.as_deref(), precision)?;
        let model = BatchedModel::load(
            &path,
            &[(e.input.as_str(), e.input_shape.to_vec()), (e.t_input.as_str(), vec![])],
            (e.output.as_str(), e.input_shape.to_vec()),
        )?;
        Ok(Self { model, entry: e })
    }
}

impl Denoiser for TractDenoiser {
    fn predict_eps(&mut self, x_t: ArrayView4<f32>, t: u32) -> Result<Array4<f32>> {
        check_batch(&x_t, self.entry.input_shape, "denoiser input")?;
        let out = self.model.run_chunked(x_t, Some(t as f32))?;
        out.into_dimensionality::<Ix4>()
            .map_err(|e| Error::Backend(format!("denoiser output: {e}")))
    }
}
