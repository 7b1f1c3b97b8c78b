//! Seeded Gaussian noise streams: all randomness of the purifier comes from here.
//!
//! Every draw is keyed by (seed, frame index, vote, draw), where draw 0 is the noise z that
//! takes the image to x_{T*} and draw k >= 1 is the fresh noise z' of the k-th DDIM step. Each key
//! seeds its own xoshiro256++ stream, so a frame's noise does not depend on which other frames
//! share its batch, and an attack can replay exactly the noise of a forward pass.

use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Identity of one purification: which frame, which vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId {
    /// Index of the frame in its stream or data set.
    pub frame: u64,
    /// Vote number (0..votes) of this purification of the frame.
    pub vote: u32,
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
        let id = self.items[item];
        let mut rng = stream(self.seed, id.frame, id.vote, draw as u32);
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

/// The xoshiro256++ generator of one key. Its 256-bit state comes from splitmix64 over the key,
/// which decorrelates neighbouring keys (frame 1 vs frame 2) and never yields the all-zero state.
pub fn stream(seed: u64, frame: u64, vote: u32, draw: u32) -> Xoshiro256PlusPlus {
    let mut h = splitmix64(seed ^ 0x6469_6666_7368_6c64); // "diffshld"
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
