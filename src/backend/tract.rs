//! Inference on tract: on the CPU (float32, or the int8 QOperator models with `precision =
//! "int8"`) with this crate's kernels swapped in, or on another tract runtime (tract-cuda's
//! `cuda`, feature `cuda`) on the plain ONNX graph: an [`Engine`].
//!
//! A model is parsed and decluttered once with its symbolic batch dimension; each batch size
//! actually used (up to the engine's [`Engine::max_plan_batch`]; larger batches run in chunks)
//! gets its own optimized plan (the batch fixed before codegen, so tract can pick kernels for
//! the real shapes), built on first use and cached with a reusable session state.

use super::{Classifier, Denoiser};
use crate::config::Precision;
use crate::error::{Error, Result};
use crate::manifest::{ClassifierEntry, ClassifierRole, DenoiserEntry, Manifest};
use ndarray::{Array2, Array4, ArrayD, ArrayView4, Axis, Ix2, Ix4};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

/// Most threads per CPU core a pipeline may ask for: more only adds scheduling overhead, and a
/// typo such as `--threads 3000` would otherwise start thousands of threads.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The CPU threads the models of one pipeline run on: 1 keeps everything on the calling
/// thread, n > 1 a rayon pool of n threads made once and shared by the pipeline's models, which
/// this crate's kernels split their work over. Per pipeline, not process-wide, so two pipelines
/// in one process keep their own thread counts.
#[derive(Debug, Clone, Default)]
pub struct CpuThreads {
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// tract's own ops: the same pool, or one thread when [`TRACT_THREADS_ENV`] is `0`.
    tract: Executor,
}

impl CpuThreads {
    /// Everything on the calling thread.
    pub fn single() -> Self {
        Self { pool: None, tract: Executor::SingleThread }
    }

    /// `threads` threads: refused when 0 or more than [`MAX_THREADS_PER_CORE`] per core of this
    /// machine (the message names the core count), and an error rather than a panic when the
    /// OS refuses to start them (a process limit).
    pub fn new(threads: usize) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads == 0 || threads > MAX_THREADS_PER_CORE * cores {
            return Err(Error::InvalidConfig(format!(
                "threads must be in 1..={} ({MAX_THREADS_PER_CORE} per core; this machine has \
                 {cores} cores), got {threads}",
                MAX_THREADS_PER_CORE * cores
            )));
        }
        // Checked at any thread count, before threads start: a bad value is refused alike.
        let tract_threads =
            super::switches::switch(TRACT_THREADS_ENV, true).map_err(Error::InvalidConfig)?;
        if threads == 1 {
            return Ok(Self::single());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("diffshield-cpu-{i}"))
            .build()
            .map_err(|e| {
                Error::InvalidConfig(format!(
                    "cannot start {threads} CPU threads ({e}); the process may be at its thread \
                     limit (ulimit -u): ask for fewer"
                ))
            })?;
        let pool = std::sync::Arc::new(pool);
        let tract = if tract_threads {
            Executor::MultiThread(pool.clone())
        } else {
            Executor::SingleThread
        };
        Ok(Self { pool: Some(pool), tract })
    }

    /// Runs `f` with these threads as the pool of this crate's kernels and of tract's own ops
    /// (its matrix products and element-wise kernels) unless [`TRACT_THREADS_ENV`] said no.
    /// With a pool, the whole run moves onto one of its threads: the calling thread would
    /// otherwise do the serial work between the kernels while the pool's idle threads spin,
    /// three busy threads on two cores (batch-1 calls ran 2.3x slower that way).
    fn scope<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            None => f(),
            Some(pool) => pool.install(|| {
                let tract = self.tract.clone();
                super::par::scope(Some(pool.clone()), || multithread_tract_scope(tract, f))
            }),
        }
    }
}

/// Environment switch: `0` keeps tract's own ops on the calling thread while this crate's
/// kernels use the pipeline's threads (to measure what tract's threading adds).
pub const TRACT_THREADS_ENV: &str = "DIFFSHIELD_TRACT_THREADS";

/// Largest batch one CPU plan runs; larger batches run in chunks. This bounds the plan cache
/// to this many plans (an attack's shrinking active set would otherwise build one per size),
/// and the per-sample conv split of `tract_opt` makes bigger plans slower to build and no
/// faster to run.
pub const MAX_PLAN_BATCH: usize = 8;

/// Largest batch one plan of another runtime (a GPU) runs: a GPU needs large batches to fill.
pub const MAX_DEVICE_PLAN_BATCH: usize = 256;

/// Where a model's plans run.
#[derive(Debug, Clone)]
pub enum Engine {
    /// tract's CPU runtime with this crate's kernels and graph passes, on these threads.
    Cpu(CpuThreads),
    /// Another registered tract runtime (tract-cuda's `cuda`) on the plain ONNX graph: our
    /// CPU-only fused ops are not swapped in, and tract's own placement decides what runs on
    /// the device.
    Runtime(&'static dyn Runtime),
}

impl Default for Engine {
    fn default() -> Self {
        Engine::Cpu(CpuThreads::single())
    }
}

impl Engine {
    /// The largest batch one plan runs.
    pub fn max_plan_batch(&self) -> usize {
        match self {
            Engine::Cpu(_) => MAX_PLAN_BATCH,
            Engine::Runtime(_) => MAX_DEVICE_PLAN_BATCH,
        }
    }

    /// A short name for logs and reports (`cpu`, or the runtime's name).
    pub fn name(&self) -> String {
        match self {
            Engine::Cpu(_) => "cpu".into(),
            Engine::Runtime(rt) => rt.name().to_string(),
        }
    }
}

/// A loaded ONNX model with per-batch-size plans.
struct BatchedModel {
    path: PathBuf,
    base: TypedModel,
    batch: Symbol,
    states: HashMap<usize, Box<dyn State>>,
    engine: Engine,
}

impl BatchedModel {
    /// Loads `path` and checks it against the manifest: input names in order, each input's shape
    /// `[batch, rest...]` (the batch dimension must be symbolic) and the output name and shape.
    fn load(
        path: &Path,
        inputs: &[(&str, Vec<usize>)],
        output: (&str, Vec<usize>),
        engine: &Engine,
    ) -> Result<Self> {
        let load_err = |reason: String| Error::ModelLoad { path: path.to_path_buf(), reason };
        let mismatch =
            |reason: String| Error::ManifestMismatch { path: path.to_path_buf(), reason };
        crate::files::check_regular_file(path).map_err(|e| load_err(crate::files::reason(&e)))?;
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
        let typed =
            model.into_typed().map_err(|e| mismatch(format!("shape analysis failed ({e})")))?;
        check_weights_finite(&typed).map_err(load_err)?;
        let level = match engine {
            Engine::Cpu(_) => super::KernelLevel::from_env().map_err(Error::InvalidConfig)?,
            Engine::Runtime(_) => super::KernelLevel::Tract,
        };
        let typed = super::tract_opt::prepare(typed, level)
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
        Ok(Self {
            path: path.to_path_buf(),
            base: typed,
            batch,
            states: HashMap::new(),
            engine: engine.clone(),
        })
    }

    /// Runs `x` (plus, for a denoiser, the timestep `t` for every item) in chunks of at most
    /// the engine's plan batch and concatenates the first output along the batch axis.
    fn run_chunked(&mut self, x: ArrayView4<f32>, t: Option<f32>) -> Result<ArrayD<f32>> {
        let mut parts = Vec::new();
        for chunk in x.axis_chunks_iter(Axis(0), self.engine.max_plan_batch()) {
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
            log::debug!(
                "building a {} plan for {} at batch {n}",
                self.engine.name(),
                self.path.display()
            );
            let state = self.plan(n).and_then(|p| p.spawn()).map_err(backend)?;
            self.states.insert(n, state);
        }
        let state = self.states.get_mut(&n).expect("inserted above");
        match &self.engine {
            Engine::Cpu(threads) => threads.scope(|| state.run(inputs)),
            Engine::Runtime(_) => state.run(inputs),
        }
        .map_err(|e| Error::Backend(format!("{}: {e:#}", self.path.display())))
    }

    /// The engine's runnable plan at batch `n`.
    fn plan(&self, n: usize) -> TractResult<Box<dyn Runnable>> {
        let subs = HashMap::from([(self.batch.clone(), TDim::from(n as i64))]);
        let fixed = self.base.set_symbols(&subs)?;
        match &self.engine {
            Engine::Cpu(_) => {
                let plan = super::tract_opt::optimise(fixed)?.into_runnable()?;
                Ok(Box::new(plan))
            }
            Engine::Runtime(rt) => rt.prepare(fixed),
        }
    }

    /// Every node of the engine's plan at batch `n`: (node name, op name).
    fn nodes(&self, n: usize) -> Result<Vec<(String, String)>> {
        let backend = |e: TractError| Error::Backend(format!("{}: {e:#}", self.path.display()));
        let plan = self.plan(n).map_err(backend)?;
        let model = plan
            .typed_model()
            .ok_or_else(|| Error::Backend("the plan exposes no model to list".into()))?;
        Ok(model.nodes().iter().map(|n| (n.name.clone(), n.op.name().to_string())).collect())
    }
}

/// Refuses a model with a NaN or infinite float constant (a corrupted or badly exported weight):
/// it would compute plausible-looking garbage, not fail.
fn check_weights_finite(model: &TypedModel) -> std::result::Result<(), String> {
    for node in model.nodes() {
        let Some(k) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() else { continue };
        let t = k.val();
        if !t.datum_type().is_float() {
            continue;
        }
        let values = t.cast_to::<f32>().map_err(|e| format!("weight {}: {e}", node.name))?;
        let values = values
            .to_plain_array_view::<f32>()
            .map_err(|e| format!("weight {}: {e}", node.name))?;
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(format!(
                "weight {} holds a non-finite value ({v}) at element {i}: the file is corrupt",
                node.name
            ));
        }
    }
    Ok(())
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

    /// Loads the manifest's classifier at `precision` (`int8_file` for int8), on one CPU thread.
    pub fn load_with(manifest: &Manifest, precision: Precision) -> Result<Self> {
        Self::load_on(manifest, precision, &Engine::default())
    }

    /// Loads the manifest's classifier at `precision` on `engine`.
    pub fn load_on(manifest: &Manifest, precision: Precision, engine: &Engine) -> Result<Self> {
        Self::load_role(manifest, ClassifierRole::Bare, precision, engine)
    }

    /// Loads the classifier of `role` at `precision` on `engine`.
    pub fn load_role(
        manifest: &Manifest,
        role: ClassifierRole,
        precision: Precision,
        engine: &Engine,
    ) -> Result<Self> {
        let e = manifest.classifier_entry(role);
        let defended = role == ClassifierRole::Defended && manifest.has_defended_classifier();
        let what = if defended { "defended classifier" } else { "classifier" };
        let path = manifest.file_at(what, &e.file, e.int8_file.as_deref(), precision)?;
        let model = BatchedModel::load(
            &path,
            &[(e.input.as_str(), e.input_shape.to_vec())],
            (e.output.as_str(), vec![e.classes.len()]),
            engine,
        )?;
        Ok(Self { model, entry: e })
    }

    /// Every node of the plan at batch `n`: (node name, op name); on a device engine, which
    /// ops it runs and which stayed on the CPU.
    pub fn plan_nodes(&self, n: usize) -> Result<Vec<(String, String)>> {
        self.model.nodes(n)
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

    /// Loads the denoiser of tier `name` at `precision` (`int8_file` for int8), on one CPU
    /// thread.
    pub fn load_with(manifest: &Manifest, name: &str, precision: Precision) -> Result<Self> {
        Self::load_on(manifest, name, precision, &Engine::default())
    }

    /// Loads the denoiser of tier `name` at `precision` on `engine`.
    pub fn load_on(
        manifest: &Manifest,
        name: &str,
        precision: Precision,
        engine: &Engine,
    ) -> Result<Self> {
        let e = manifest.denoiser(name)?.clone();
        let what = format!("denoiser {name}");
        let path = manifest.file_at(&what, &e.file, e.int8_file.as_deref(), precision)?;
        let model = BatchedModel::load(
            &path,
            &[(e.input.as_str(), e.input_shape.to_vec()), (e.t_input.as_str(), vec![])],
            (e.output.as_str(), e.input_shape.to_vec()),
            engine,
        )?;
        Ok(Self { model, entry: e })
    }

    /// Every node of the plan at batch `n`: (node name, op name).
    pub fn plan_nodes(&self, n: usize) -> Result<Vec<(String, String)>> {
        self.model.nodes(n)
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

/// Where one call of a model spends its time, by op type or by node.
#[derive(Debug, Clone, PartialEq)]
pub struct OpProfile {
    /// Mean wall time of one call, ms.
    pub call_ms: f64,
    /// Ops (or nodes) and their mean time per call, slowest first.
    pub ops: Vec<OpTime>,
}

/// One op type's (or node's) share of a call.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// Op type (`DirectConv`, `GroupNorm`, ...) or, per node, `TYPE node-name`.
    pub name: String,
    /// Mean time per call, ms.
    pub ms: f64,
    /// Nodes of this type in the plan.
    pub nodes: usize,
}

/// Profiles `reps` calls of the ONNX model at `path` at batch `batch` on synthetic inputs
/// (t = 140 for a denoiser), planned exactly as the runtime plans it (the kernel level of
/// [`super::KERNELS_ENV`]), on `threads`, by op type or with `per_node` by node.
pub fn profile_ops(
    path: &Path,
    batch: usize,
    reps: usize,
    per_node: bool,
    threads: &CpuThreads,
) -> Result<OpProfile> {
    let fail = |e: TractError| Error::Backend(format!("{}: {e:#}", path.display()));
    let model = tract_onnx::onnx().model_for_path(path).map_err(|e| Error::ModelLoad {
        path: path.to_path_buf(),
        reason: format!("not a valid ONNX model ({e})"),
    })?;
    let denoiser = model.input_outlets().map_err(fail)?.len() == 2;
    let level = super::KernelLevel::from_env().map_err(Error::InvalidConfig)?;
    let typed =
        model.into_typed().and_then(|m| super::tract_opt::prepare(m, level)).map_err(fail)?;
    let TDim::Sym(b) = typed.input_fact(0).map_err(fail)?.shape[0].clone() else {
        return Err(Error::Shape {
            expected: "a symbolic batch dimension".into(),
            got: "a fixed one".into(),
        });
    };
    let subs = HashMap::from([(b, TDim::from(batch as i64))]);
    let plan = typed
        .set_symbols(&subs)
        .and_then(super::tract_opt::optimise)
        .and_then(|m| m.into_runnable())
        .map_err(fail)?;
    let mut state = plan.spawn().map_err(fail)?;
    let x = tract_ndarray::Array4::from_shape_fn((batch, 3, 32, 32), |(_, c, h, w)| {
        ((c * 5 + h * 3 + w) % 29) as f32 / 14.0 - 1.0
    });
    let mut inputs: TVec<TValue> = tvec![x.into_tensor().into_tvalue()];
    if denoiser {
        inputs.push(tract_ndarray::Array1::from_elem(batch, 140f32).into_tensor().into_tvalue());
    }
    threads.scope(|| state.run(inputs.clone())).map_err(fail)?;
    let reps = reps.max(1);
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        threads
            .scope(|| {
                state.run_plan_with_eval(inputs.clone(), |s, st, node, inp| {
                    let t = std::time::Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(s, st, node, inp);
                    let key = if per_node {
                        format!("{} {}", node.op.name(), node.name)
                    } else {
                        node.op.name().to_string()
                    };
                    let e = by_op.entry(key).or_default();
                    e.0 += t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                    e.1 += 1;
                    r
                })
            })
            .map_err(fail)?;
    }
    let call_ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let mut ops: Vec<OpTime> = by_op
        .into_iter()
        .map(|(name, (ms, calls))| OpTime { name, ms, nodes: calls / reps })
        .collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(OpProfile { call_ms, ops })
}
