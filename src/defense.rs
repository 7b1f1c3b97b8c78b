//! The embedding API: build a [`Defense`] once, hand it frames, get [`Decision`]s.
//!
//! A `Defense` owns everything a camera app should not have to know: the models folder and
//! manifest (input size, classes), the DDIM plan, the frame numbering that keys the noise
//! streams, the seed (from the OS unless fixed), the latency-budget protocol (calibrated when
//! built) and the resize of frames of any size. It is `Send`, so it can live on a worker thread.

use crate::budget::Budget;
use crate::config::{DefenseConfig, Precision, VoteRule};
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::input::Image;
use crate::manifest::Manifest;
use crate::pipeline::Pipeline;
use crate::stream::{spawn_producer, FrameQueue, FrameSource, LatencySummary};
use ndarray::{ArrayView4, Axis};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Builder of a [`Defense`]; every setting defaults to [`DefenseConfig::default`].
#[derive(Debug, Clone, Default)]
pub struct DefenseBuilder {
    config: DefenseConfig,
}

impl DefenseBuilder {
    /// Starts from a whole configuration (a TOML file's, say) instead of the defaults.
    pub fn config(mut self, config: DefenseConfig) -> Self {
        self.config = config;
        self
    }

    /// The folder holding `models.toml` and the ONNX files (default: `DIFFSHIELD_MODELS`, else
    /// the models this library was built with).
    pub fn models(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.models = Some(dir.into());
        self
    }

    /// The denoiser tier of the manifest: `"s"` (1.6 M parameters, the default) or `"m"`.
    pub fn denoiser(mut self, tier: &str) -> Self {
        self.config.denoiser = tier.to_string();
        self
    }

    /// Purifications per frame, combined by the vote rule (default 3).
    pub fn votes(mut self, votes: u32) -> Self {
        self.config.votes = votes;
        self
    }

    /// How the votes combine (default: majority).
    pub fn vote_rule(mut self, rule: VoteRule) -> Self {
        self.config.vote_rule = rule;
        self
    }

    /// Per-frame latency budget in ms: steps and votes are planned per frame to fit, from
    /// costs measured when the defence is built (which refuses a budget that cannot fit one
    /// step).
    pub fn budget_ms(mut self, ms: f64) -> Self {
        self.config.budget_ms = Some(ms);
        self
    }

    /// Diffusion depth T* (default 140; within the denoiser's trained range).
    pub fn t_star(mut self, t_star: u32) -> Self {
        self.config.t_star = t_star;
        self
    }

    /// DDIM stride: tau = T*, T*-stride, ..., 0 (default 10).
    pub fn stride(mut self, stride: u32) -> Self {
        (self.config.stride, self.config.steps, self.config.timesteps) = (Some(stride), None, None);
        self
    }

    /// Number of DDIM steps from T* to 0, evenly spaced (instead of a stride).
    pub fn steps(mut self, steps: u32) -> Self {
        (self.config.stride, self.config.steps, self.config.timesteps) = (None, Some(steps), None);
        self
    }

    /// Fresh-noise scale of every DDIM step, in \[0, 1\] (default 1, the paper's sampler).
    pub fn eta(mut self, eta: f64) -> Self {
        self.config.eta = eta;
        self
    }

    /// A fixed noise seed, for tests and replays only: a deployed defence should keep the
    /// default, a fresh seed from the OS, so that its noise cannot be predicted.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// CPU threads the models run on (default: one per core this process may run on,
    /// [`crate::config::default_threads`]): every op of a frame splits its work over them,
    /// batch 1 included, and any count gives the same results bit for bit.
    pub fn threads(mut self, threads: usize) -> Self {
        self.config.threads = threads;
        self
    }

    /// Model precision (default f32; int8 is about twice as fast on CPUs with AVX-512 VNNI).
    pub fn precision(mut self, precision: Precision) -> Self {
        self.config.precision = precision;
        self
    }

    /// Abstain (label `None`, class "unknown") below this mean probability, in \[0, 1\].
    pub fn min_confidence(mut self, min: f32) -> Self {
        self.config.min_confidence = Some(min);
        self
    }

    /// Classes listed in each decision's `top_k` (default 3).
    pub fn top_k(mut self, k: usize) -> Self {
        self.config.top_k = k;
        self
    }

    /// Frames purified together by [`Defense::classify_images`] (default 1).
    pub fn batch(mut self, batch: usize) -> Self {
        self.config.batch = batch;
        self
    }

    /// Loads the models and, under a budget, measures the costs the planner needs.
    pub fn build(self) -> Result<Defense> {
        Defense::from_config(&self.config)
    }
}

/// How [`Defense::run_stream`] paces and queues frames, and when it stops.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Frames per second the source delivers (Hz); `None`: as fast as the defence takes them
    /// (nothing is dropped).
    pub rate_hz: Option<f64>,
    /// Stop after this many frames.
    pub limit: Option<u64>,
    /// Frames that may wait while one is processed; a paced stream drops the oldest beyond it.
    pub queue: usize,
    /// Set (by a signal handler, another thread) to stop the stream: the frame in progress is
    /// finished, the queued ones are counted as dropped, and the summary says `interrupted`.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self { rate_hz: None, limit: None, queue: 4, stop: None }
    }
}

/// How often a stream's consumer looks at the stop flag while waiting for a frame.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// One decision of a stream with where its frame came from and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamedDecision {
    /// The decision.
    pub decision: Decision,
    /// The frame's source name (file path, `stdin#k`, `FILE#k`).
    pub source: String,
    /// The frame's true class, where its source knows it (CIFAR-10 records).
    pub true_label: Option<u8>,
    /// From the frame's arrival in the queue to its decision, ms.
    pub latency_ms: f64,
    /// Time the frame waited in the queue before processing started, ms.
    pub queued_ms: f64,
}

/// What a whole stream did.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOutcome {
    /// Frames, deadlines missed, drops and processing-latency percentiles.
    pub latency: LatencySummary,
    /// The seed of the run's noise streams (replays it with the same frames).
    pub seed: u64,
}

/// A stream that failed: the error and, when it had started, the summary of the frames
/// classified before it (each of which went to the callback).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct StreamFailure {
    /// Why the stream stopped.
    #[source]
    pub error: Error,
    /// The frames before it; `None` when the stream was refused before it started (bad options).
    pub partial: Option<Box<StreamOutcome>>,
}

/// The defended classifier a camera app embeds. See the crate documentation for an example.
pub struct Defense {
    pipeline: Pipeline,
    config: DefenseConfig,
    budget: Option<Budget>,
    input: [usize; 3],
    next_frame: u64,
}

impl Defense {
    /// A builder with every setting at its default.
    pub fn builder() -> DefenseBuilder {
        DefenseBuilder::default()
    }

    /// Builds the defence `config` describes: checks it, finds the models (see
    /// [`DefenseConfig::models_dir`]), loads them, draws the seed (from the OS unless
    /// `config.seed` is set) and, under a budget, calibrates the planner (refusing a budget
    /// that cannot fit one step).
    pub fn from_config(config: &DefenseConfig) -> Result<Self> {
        let mut config = config.clone();
        config.validate()?;
        crate::backend::resolve_precision(&mut config);
        let models = config.models_dir()?;
        let manifest = Manifest::load(&models)?;
        let classes = manifest.classifier.classes.len();
        if config.top_k > classes {
            return Err(Error::InvalidConfig(format!(
                "top_k {} is more than the classifier's {classes} classes",
                config.top_k
            )));
        }
        config.models = Some(models);
        config.seed = Some(config.resolve_seed()?);
        let mut pipeline = Pipeline::from_config(&config)?;
        let input = manifest.classifier.input_shape;
        let budget = config.budget(pipeline.plan().steps().len());
        if let Some(b) = &budget {
            pipeline.calibrate(b, input)?;
        }
        Ok(Self { pipeline, config, budget, input, next_frame: 0 })
    }

    /// The models' input size `(height, width)` in pixels; frames of any other size are fitted
    /// to it.
    pub fn input_size(&self) -> (usize, usize) {
        (self.input[1], self.input[2])
    }

    /// The seed of this defence's noise streams: with the same frames in the same order,
    /// `Defense::builder().seed(seed)` (or `--seed`) replays every decision bit for bit.
    pub fn seed(&self) -> u64 {
        self.pipeline.seed()
    }

    /// Class names in label order.
    pub fn classes(&self) -> &[String] {
        self.pipeline.classes()
    }

    /// The configuration in force, with the models folder and the seed resolved.
    pub fn config(&self) -> &DefenseConfig {
        &self.config
    }

    /// The DDIM timesteps of the full plan, T* first, 0 last.
    pub fn timesteps(&self) -> &[u32] {
        self.pipeline.plan().timesteps()
    }

    /// The index the next frame will get (0 for a new defence).
    pub fn next_frame(&self) -> u64 {
        self.next_frame
    }

    /// Numbers the next frame `frame`: to replay decision k of an earlier run, build with its
    /// seed and start at its `frame`.
    pub fn set_next_frame(&mut self, frame: u64) {
        self.next_frame = frame;
    }

    /// The pipeline underneath, for harnesses that key frames themselves.
    pub fn pipeline_mut(&mut self) -> &mut Pipeline {
        &mut self.pipeline
    }

    /// Classifies one frame of any size (fitted to [`Defense::input_size`]); it gets the next
    /// frame index.
    pub fn classify(&mut self, frame: Image<'_>) -> Result<Decision> {
        let x = frame.fit(self.input_size())?.insert_axis(Axis(0));
        let mut d = self.classify_images(x.view())?;
        d.pop().ok_or_else(|| Error::Backend("no decision for the frame".into()))
    }

    /// Classifies frames of any sizes, in order, with consecutive frame indices.
    pub fn classify_batch(&mut self, frames: &[Image<'_>]) -> Result<Vec<Decision>> {
        let size = self.input_size();
        let fitted = frames.iter().map(|f| f.fit(size)).collect::<Result<Vec<_>>>()?;
        if fitted.is_empty() {
            return Ok(Vec::new());
        }
        let views: Vec<_> = fitted.iter().map(|a| a.view()).collect();
        let x = ndarray::stack(Axis(0), &views).map_err(|e| Error::Backend(e.to_string()))?;
        self.classify_images(x.view())
    }

    /// Classifies NCHW images already at the input size (\[0,1\] f32), `batch` frames per
    /// pipeline call (one under a budget); frame indices continue from [`Defense::next_frame`].
    pub fn classify_images(&mut self, images: ArrayView4<f32>) -> Result<Vec<Decision>> {
        self.classify_images_with(images, &mut |_| {})
    }

    /// [`Defense::classify_images`], calling `progress` with each finished chunk's decisions.
    pub fn classify_images_with(
        &mut self,
        images: ArrayView4<f32>,
        progress: &mut dyn FnMut(&[Decision]),
    ) -> Result<Vec<Decision>> {
        self.check_input(images)?;
        let batch = if self.budget.is_some() { 1 } else { self.config.batch };
        let mut out = Vec::with_capacity(images.shape()[0]);
        for chunk in images.axis_chunks_iter(Axis(0), batch) {
            let first = self.next_frame;
            let d = match &self.budget {
                Some(b) => vec![self.pipeline.decide_within(chunk, first, b)?],
                None => self.pipeline.decide(chunk, first)?,
            };
            self.next_frame += chunk.shape()[0] as u64;
            progress(&d);
            out.extend(d);
        }
        Ok(out)
    }

    /// The bare classifier's decisions (no purification) on NCHW images at the input size, for
    /// comparison; frame indices are not used.
    pub fn classify_undefended(&mut self, images: ArrayView4<f32>) -> Result<Vec<Decision>> {
        self.check_input(images)?;
        let mut out = Vec::with_capacity(images.shape()[0]);
        for (k, chunk) in images.axis_chunks_iter(Axis(0), UNDEFENDED_CHUNK).enumerate() {
            out.extend(self.pipeline.decide_undefended(chunk, (k * UNDEFENDED_CHUNK) as u64)?);
        }
        Ok(out)
    }

    /// Classifies a stream: `source` runs on its own thread, paced and queued per `options`;
    /// each decision goes to `on_decision` as soon as it is made (an error from it stops the
    /// stream and is returned). Frames are numbered from [`Defense::next_frame`] in arrival
    /// order (dropped frames keep their numbers). The source must deliver frames at the input
    /// size (the sources' `with_size`). A failure part-way (a frame that cannot be read, the
    /// callback's error) comes with the summary of the frames before it.
    pub fn run_stream(
        &mut self,
        source: Box<dyn FrameSource>,
        options: &StreamOptions,
        on_decision: &mut dyn FnMut(StreamedDecision) -> Result<()>,
    ) -> std::result::Result<StreamOutcome, StreamFailure> {
        let seed = self.seed();
        let refused = |error: Error| StreamFailure { error, partial: None };
        if options.limit == Some(0) {
            return Err(refused(Error::InvalidConfig("--limit 0 classifies no frame".into())));
        }
        let queue = Arc::new(FrameQueue::new(options.queue).map_err(refused)?);
        let producer = spawn_producer(source, options.rate_hz, options.limit, Arc::clone(&queue))
            .map_err(refused)?;
        let base = self.next_frame;
        let mut latencies = Vec::new();
        let mut missed = 0u64;
        let mut outcome = Ok(());
        let stopped = || options.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let mut interrupted = false;
        loop {
            if stopped() {
                interrupted = true;
                break;
            }
            let Some(frame) = queue.pop_timeout(STOP_POLL) else {
                if queue.is_closed() && queue.is_empty() {
                    break;
                }
                continue;
            };
            let started = Instant::now();
            let x = frame.image.view().insert_axis(Axis(0));
            self.next_frame = base + frame.index;
            let decided = self.classify_images(x).and_then(|mut d| {
                d.pop().ok_or_else(|| Error::Backend("no decision for the frame".into()))
            });
            let decision = match decided {
                Ok(d) => d,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            let latency_ms = started.elapsed().as_secs_f64() * 1e3;
            latencies.push(latency_ms / 1e3);
            missed += u64::from(decision.deadline_met == Some(false));
            let streamed = StreamedDecision {
                decision,
                source: frame.source,
                true_label: frame.label,
                latency_ms,
                queued_ms: (started - frame.arrived).as_secs_f64() * 1e3,
            };
            if let Err(e) = on_decision(streamed) {
                outcome = Err(e);
                break;
            }
        }
        let produced = if interrupted {
            queue.abandon();
            // The reader may be blocked on its input (a pipe, a watched folder): it ends by
            // itself at its next frame, as the queue is closed; nothing is left to wait for.
            drop(producer);
            Ok(0)
        } else {
            queue.close();
            producer
                .join()
                .unwrap_or_else(|_| Err(Error::Backend("the frame reader thread panicked".into())))
        };
        let mut latency = LatencySummary::from_latencies(&latencies, missed, queue.dropped());
        latency.rejected = queue.rejected();
        latency.received = queue.pushed() + latency.rejected;
        latency.interrupted = interrupted;
        let done = StreamOutcome { latency, seed };
        match outcome.and(produced.map(|_| ())) {
            Ok(()) => Ok(done),
            Err(error) => Err(StreamFailure { error, partial: Some(Box::new(done)) }),
        }
    }

    fn check_input(&self, images: ArrayView4<f32>) -> Result<()> {
        if images.shape()[1..] != self.input {
            return Err(Error::Shape {
                expected: format!(
                    "frames [N, {}, {}, {}]",
                    self.input[0], self.input[1], self.input[2]
                ),
                got: format!("{:?}", images.shape()),
            });
        }
        Ok(())
    }
}

/// Images per call of the bare classifier in [`Defense::classify_undefended`].
const UNDEFENDED_CHUNK: usize = 100;

/// Defended and undefended accuracy on labelled images, as `diffshield eval` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Accuracy {
    /// Images evaluated.
    pub images: usize,
    /// The bare classifier's accuracy, in \[0, 1\].
    pub clean_acc: f64,
    /// The defended pipeline's accuracy (abstentions count as wrong); `None` when skipped.
    pub purified_acc: Option<f64>,
    /// Decisions that abstained (with `min_confidence`).
    pub abstained: usize,
    /// Under a budget: frames that missed their deadline.
    pub deadline_missed: Option<usize>,
    /// Under a budget: mean DDIM steps run per frame.
    pub mean_steps: Option<f64>,
    /// Wall time of the bare classifier's pass, ms.
    pub clean_ms: f64,
    /// Wall time of the defended pass, ms.
    pub purified_ms: Option<f64>,
}

impl Defense {
    /// Accuracy of the bare classifier and (with `defended`) of the defence on `images`
    /// (NCHW at the input size) with true `labels`; the defended frames get consecutive frame
    /// indices from [`Defense::next_frame`]. `progress` is called with the number of defended
    /// frames done.
    pub fn accuracy(
        &mut self,
        images: ArrayView4<f32>,
        labels: &[u8],
        defended: bool,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Accuracy> {
        if labels.len() != images.shape()[0] {
            return Err(Error::Shape {
                expected: format!("{} labels", images.shape()[0]),
                got: format!("{}", labels.len()),
            });
        }
        let n = labels.len();
        if n == 0 {
            return Err(Error::InvalidConfig("no images to evaluate (--limit 0?)".into()));
        }
        let correct = |d: &[Decision]| {
            d.iter().zip(labels).filter(|(d, &l)| d.label == Some(usize::from(l))).count() as f64
                / n.max(1) as f64
        };
        let t0 = Instant::now();
        let clean = self.classify_undefended(images)?;
        let mut acc = Accuracy {
            images: n,
            clean_acc: correct(&clean),
            purified_acc: None,
            abstained: 0,
            deadline_missed: None,
            mean_steps: None,
            clean_ms: t0.elapsed().as_secs_f64() * 1e3,
            purified_ms: None,
        };
        if defended {
            let t1 = Instant::now();
            let mut done = 0;
            let d = self.classify_images_with(images, &mut |d| {
                done += d.len();
                progress(done);
            })?;
            acc.purified_acc = Some(correct(&d));
            acc.abstained = d.iter().filter(|d| d.label.is_none()).count();
            if self.budget.is_some() {
                acc.deadline_missed =
                    Some(d.iter().filter(|d| d.deadline_met == Some(false)).count());
                acc.mean_steps =
                    Some(d.iter().map(|d| d.steps).sum::<usize>() as f64 / n.max(1) as f64);
            }
            acc.purified_ms = Some(t1.elapsed().as_secs_f64() * 1e3);
        }
        Ok(acc)
    }
}

/// Compile-time proof that a `Defense` can move to another thread.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Defense>();
};

#[cfg(test)]
mod tests {
    #[test]
    fn builder_settings_land_in_the_config() {
        let b = super::Defense::builder().votes(5).denoiser("m").budget_ms(50.0).seed(3).steps(4);
        assert_eq!(b.config.votes, 5);
        assert_eq!(b.config.denoiser, "m");
        assert_eq!(b.config.budget_ms, Some(50.0));
        assert_eq!(b.config.seed, Some(3));
        assert_eq!((b.config.stride, b.config.steps), (None, Some(4)));
    }
}
