//! Seeded Gaussian noise streams: all randomness of the purifier comes from here.
//!
//! Every draw is keyed by (seed, domain, frame index, vote, draw), where draw 0 is the noise z
//! that takes the image to x_{T*} and draw k >= 1 is the fresh noise z' of the k-th DDIM step.
//! Each key seeds its own xoshiro256++ stream, so a frame's noise does not depend on which other
//! frames share its batch, and an attack can replay exactly the noise of a forward pass. The
//! [`NoiseDomain`] keeps the purifications of different jobs (deployed frames, the budget's
//! calibration probes, an attacker's EOT samples, evaluation runs) apart whatever their frame
//! numbers.

use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Which job a purification belongs to. Streams of different domains never coincide, so an
/// attacker's samples never reuse the noise its evaluation runs draw, and the budget's start-up
/// probes never use a real frame's noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NoiseDomain {
    /// Deployed frames of a stream or data set (`classify`, `run`, `eval`, the embedding API):
    /// the frame index is the frame's position in its stream.
    #[default]
    Frames,
    /// The budget planner's timing probes at start-up.
    Calibration,
    /// Untimed warm-up frames (tune).
    Warmup,
    /// The EOT purification samples of attack `attack` (from 0) in attack cell `cell` (vote =
    /// PGD iteration x EOT samples + sample).
    AttackEot {
        /// The (threat model, mode) cell, numbered from 1.
        cell: u32,
        /// The crafting attack's place in the cell's list, from 0.
        attack: u32,
    },
    /// The defended pipeline's purifications of Square Attack query `query` in cell `cell`.
    AttackQuery {
        /// The (threat model, mode) cell, numbered from 1.
        cell: u32,
        /// The query's number within the attack.
        query: u32,
    },
    /// Fresh-noise evaluation run `run` of cell `cell` (cell 0: the clean images).
    Evaluation {
        /// The (threat model, mode) cell, numbered from 1; 0 for the clean images.
        cell: u32,
        /// The evaluation run, from 0.
        run: u32,
    },
    /// A purified training set ([`crate::purified_set`]): frame = the image's index in the set,
    /// vote = the noise draw.
    TrainingSet,
}

impl NoiseDomain {
    /// The words mixed into a stream's key; `None` for [`NoiseDomain::Frames`], whose streams
    /// are keyed by (seed, frame, vote, draw) alone as before domains existed, so deployed
    /// decisions and the figures measured on them are unchanged.
    fn key(self) -> Option<[u64; 2]> {
        let tagged = |tag: u64, a: u32, b: u32| Some([tag, (u64::from(a) << 32) | u64::from(b)]);
        match self {
            NoiseDomain::Frames => None,
            NoiseDomain::Calibration => tagged(1, 0, 0),
            NoiseDomain::Warmup => tagged(2, 0, 0),
            NoiseDomain::AttackEot { cell, attack } => tagged(3, cell, attack),
            NoiseDomain::AttackQuery { cell, query } => tagged(4, cell, query),
            NoiseDomain::Evaluation { cell, run } => tagged(5, cell, run),
            NoiseDomain::TrainingSet => tagged(6, 0, 0),
        }
    }
}

/// Identity of one purification: which domain, which frame, which vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// The job the purification belongs to.
    pub domain: NoiseDomain,
    /// Index of the frame in its stream or data set.
    pub frame: u64,
    /// Vote number (0..votes) of this purification of the frame.
    pub vote: u32,
}

impl StreamId {
    /// Vote `vote` of deployed frame `frame` ([`NoiseDomain::Frames`]).
    pub fn of_frame(frame: u64, vote: u32) -> Self {
        Self { domain: NoiseDomain::Frames, frame, vote }
    }
}

/// Source of the Gaussian noise the purifier consumes.
pub trait NoiseSource {
    /// Fills `out` (one image, C*H*W values) with standard normal f32 samples for `draw`
    /// (0 = initial noising, k = k-th DDIM step) of batch item `item`.
    fn fill(&mut self, draw: usize, item: usize, out: &mut [f32]);
}

/// The runtime's noise: one xoshiro256++ stream per (seed, frame, vote, draw).
#[derive(Debug, Clone)]
pub struct SeededNoise {
    seed: u64,
    items: Vec<StreamId>,
}

impl SeededNoise {
    /// Noise for a batch whose item i is the purification `items[i]`.
    pub fn new(seed: u64, items: Vec<StreamId>) -> Self {
        Self { seed, items }
    }

    /// The batch items' identities.
    pub fn items(&self) -> &[StreamId] {
        &self.items
    }
}

impl NoiseSource for SeededNoise {
    fn fill(&mut self, draw: usize, item: usize, out: &mut [f32]) {
        let mut rng = stream_of(self.seed, self.items[item], draw as u32);
        fill_standard_normal(&mut rng, out);
    }
}

/// Noise given explicitly as `[draw][item][C*H*W]` (golden vectors, replays in tests).
#[derive(Debug, Clone)]
pub struct FixedNoise {
    draws: Vec<Vec<Vec<f32>>>,
}

impl FixedNoise {
    /// `draws[d][i]` is the noise of draw d for batch item i.
    pub fn new(draws: Vec<Vec<Vec<f32>>>) -> Self {
        Self { draws }
    }
}

impl NoiseSource for FixedNoise {
    fn fill(&mut self, draw: usize, item: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.draws[draw][item]);
    }
}

/// A seed from the operating system's entropy source (`getrandom`): what a deployed defence
/// uses, so that nobody can predict its noise from the frame numbers. It has 53 random bits,
/// so that it survives JSON readers that hold numbers as doubles (a replay needs it exact).
pub fn os_seed() -> crate::error::Result<u64> {
    getrandom::u64().map(|s| s >> 11).map_err(|e| crate::error::Error::Entropy(e.to_string()))
}

/// Draw `draw` of every item of a batch of shape `dim` (NCHW), item i filled by
/// [`NoiseSource::fill`] for item i.
pub(crate) fn draw_batch(
    noise: &mut dyn NoiseSource,
    draw: usize,
    dim: ndarray::Ix4,
) -> ndarray::Array4<f32> {
    let mut z = ndarray::Array4::<f32>::zeros(dim);
    for (i, mut item) in z.outer_iter_mut().enumerate() {
        // A freshly allocated array is contiguous, so its items are slices.
        if let Some(out) = item.as_slice_mut() {
            noise.fill(draw, i, out);
        }
    }
    z
}

/// The xoshiro256++ generator of draw `draw` of vote `vote` of deployed frame `frame`
/// ([`NoiseDomain::Frames`]); see [`stream_of`].
pub fn stream(seed: u64, frame: u64, vote: u32, draw: u32) -> Xoshiro256PlusPlus {
    stream_of(seed, StreamId::of_frame(frame, vote), draw)
}

/// The xoshiro256++ generator of one key. Its 256-bit state comes from splitmix64 over the key,
/// which decorrelates neighbouring keys (frame 1 vs frame 2) and never yields the all-zero state.
pub fn stream_of(seed: u64, id: StreamId, draw: u32) -> Xoshiro256PlusPlus {
    let (frame, vote) = (id.frame, id.vote);
    let mut h = splitmix64(seed ^ 0x6469_6666_7368_6c64); // "diffshld"
    if let Some(words) = id.domain.key() {
        for w in words {
            h = splitmix64(h ^ w);
        }
    }
    h = splitmix64(h ^ frame);
    h = splitmix64(h ^ ((u64::from(vote) << 32) | u64::from(draw)));
    let mut state = h;
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_exact_mut(8) {
        state = splitmix64(state);
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    Xoshiro256PlusPlus::from_seed(bytes)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard normal samples by the Box-Muller transform in f64 (both outputs used). Written out
/// rather than taken from rand_distr so a GPU kernel can reproduce the same numbers.
pub fn fill_standard_normal<R: Rng>(rng: &mut R, out: &mut [f32]) {
    const TWO_POW_M53: f64 = 1.0 / (1u64 << 53) as f64;
    let mut pairs = out.chunks_exact_mut(2);
    let next_pair = |rng: &mut R| {
        // u1 in (0, 1] so ln(u1) is finite; u2 in [0, 1).
        let u1 = ((rng.next_u64() >> 11) + 1) as f64 * TWO_POW_M53;
        let u2 = (rng.next_u64() >> 11) as f64 * TWO_POW_M53;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        ((r * c) as f32, (r * s) as f32)
    };
    for pair in &mut pairs {
        let (a, b) = next_pair(rng);
        pair[0] = a;
        pair[1] = b;
    }
    if let [last] = pairs.into_remainder() {
        *last = next_pair(rng).0;
    }
}
