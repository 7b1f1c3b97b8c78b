//! Direct 3x3 (zero padding 1) and 1x1 convolutions, stride 1 (3x3 also stride 2), f32, NCHW:
//! one kernel over [`Simd`], a register tiling per level (AVX-512, AVX2 + FMA, and the
//! portable level that the compiler vectorises for the target: NEON on aarch64).
//!
//! Why it exists: tract 0.23.9 lowers every convolution to im2col + matrix product. At the
//! denoisers' 32..256 channels on 32x32 and 16x16 planes its im2col gather costs as much as
//! the arithmetic (55-90 GFLOP/s on one core here), and these convolutions are ~80 % of a
//! denoiser call; its 1x1 convs at batch > 1 become einsums that spend more time moving axes
//! and packing than multiplying. This kernel skips im2col: it keeps an output-channel x
//! 3-pixel-vector tile of accumulators in registers (AVX-512: 8 x 3 of 32 zmm; AVX2: 4 x 3 of
//! 16 ymm) and, for each input channel and tap, loads three pixel vectors straight from a
//! zero-padded copy of the input and broadcasts the block's weights against them (AVX-512: 24
//! FMAs per 11 loads, 115-165 GFLOP/s on the same core).
//!
//! Pixel vectors run along rows when the width is a multiple of the vector (1x1: when the
//! plane is); otherwise they run over the flattened padded grid (rows of `w + 2`), computing two
//! throw-away columns per row that are dropped when the result is copied out. 3x3 convs on
//! planes narrower than a vector (the classifier's 8x8 and 4x4 levels; AVX2: 4x4) turn the tile
//! around instead: vectors along output channels, pixels of all images of the batch broadcast
//! against them (see `DirectConv::small`). Stride-2 3x3 convs (the denoisers' downsampling)
//! take that layout at every plane size: it reads each broadcast pixel from its own offset, so
//! the stride costs nothing, where the pixel-vector layouts would need strided loads (tract's
//! own lowering ran them one image at a time after `super::tract_opt` split its batch, outside
//! this crate's threads). Summation order differs from tract's, so results agree to float
//! rounding (relative ~1e-6), not bit for bit.

use super::par::SyncPtr;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, PortableFma};
use super::simd::{KernelLevel, Portable, Simd};

/// AVX-512 small-plane layout: the channel tile of convs with at most this many outputs.
const NARROW_SCB: usize = 32;

/// Small planes: input channels per pass over the pixels. A chunk's weights (16 x 9 x 64 f32,
/// 36 KB on AVX-512) stay in L1 for all pixel tiles; without chunking, each tile re-streamed a
/// 1.2 MB channel block of the 4x4 convs' weights from L3 (the cost at batch 1).
const SCI: usize = 16;

/// A level's register tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    /// f32 lanes per vector.
    lanes: usize,
    /// Output channels per tile of the pixel-vector layouts.
    ocb: usize,
    /// Small planes: output channels per tile (whole vectors of channels).
    scb: usize,
    /// Small planes: pixels per tile.
    spt: usize,
    /// Winograd runs a 3x3 conv on planes at least `.0` wide when it has at least `.1` input
    /// channels (any pair), where it beat the direct kernel in `winograd::probe` with items
    /// spanning images (AVX-512: 1.31-1.56x at 64-96 channels on 32x32, 1.38-1.56x at 128-192
    /// on 16x16, 1.06-1.13x at 128 on 8x8; 0.93-1.16x at 32 channels on 32x32, 0.80-1.05x at
    /// 64 on 16x16 and 8x8, on Zen 5. AVX2, whose direct kernel runs at half that FMA rate:
    /// 1.46-2.03x on every plane from 8x8. AVX-512 on a CPU that splits each 512-bit FMA in
    /// two halves (Zen 4: [`super::simd::avx512_is_half_rate`]), so that its direct kernel runs
    /// at the AVX2 rate too: 1.08-1.56x on every plane probed but 64 channels on 8x8 at batch 8,
    /// 0.92x).
    winograd: &'static [(usize, usize)],
}

impl Tiling {
    /// AVX-512: 8 x 3 accumulators + 3 pixel vectors + a broadcast of 32 registers, small
    /// planes 4 x 6 + 4 weight vectors. AVX2: 4 x 2 + 2 + 1 and 2 x 4 + 2 + 1 of 16 (4 x 3 and
    /// 2 x 6 leave no register free, and LLVM then spills accumulators: 3.7x slower).
    fn of(level: KernelLevel) -> Option<Tiling> {
        match level {
            KernelLevel::Avx512 => {
                let winograd =
                    if super::simd::avx512_is_half_rate() { ALWAYS } else { &[(32, 64), (8, 128)] };
                Some(Tiling { lanes: 16, ocb: 8, scb: 64, spt: 6, winograd })
            }
            KernelLevel::Avx2 => {
                Some(Tiling { lanes: 8, ocb: 4, scb: 16, spt: 4, winograd: ALWAYS })
            }
            KernelLevel::Portable => Some(PORTABLE),
            KernelLevel::PortableFma => Some(PORTABLE_FMA),
            KernelLevel::Tract => None,
        }
    }
}

/// The portable level's tiles, in 8-lane vectors of two 128-bit registers. x86-64 (SSE2, 16
/// registers): 2 x 2 accumulators + 2 pixel vectors + a broadcast (13 registers), small planes
/// 2 x 2 + 2. aarch64 (NEON, 32 registers): [`PORTABLE_FMA`]. Winograd on every 3x3 conv:
/// 1.58-2.28x over the direct kernel on x86-64 in `winograd::probe` (as on AVX2, the direct
/// kernel is far below AVX-512's rate, so the saved multiplies count more); not measured on ARM.
#[cfg(target_arch = "x86_64")]
const PORTABLE: Tiling = Tiling { lanes: 8, ocb: 2, scb: 16, spt: 2, winograd: ALWAYS };
#[cfg(not(target_arch = "x86_64"))]
const PORTABLE: Tiling = PORTABLE_FMA;
/// The portable kernels' tiles where a vector is one register or two of 32 (AVX2 + FMA's 16
/// ymm; aarch64's 32 q registers): AVX2's 4 x 2 and 2 x 4 (11 of 16 ymm, 21 of 32 NEON).
const PORTABLE_FMA: Tiling = Tiling { lanes: 8, ocb: 4, scb: 16, spt: 4, winograd: ALWAYS };
/// Winograd on every 3x3 conv.
const ALWAYS: &[(usize, usize)] = &[(1, 1)];
/// Output channels per tile of the portable level (Winograd's products use the same tile).
pub(super) const PORTABLE_OCB: usize = PORTABLE.ocb;
/// The same for the portable-fma level.
#[cfg(target_arch = "x86_64")]
pub(super) const PORTABLE_FMA_OCB: usize = PORTABLE_FMA.ocb;

/// A 3x3 or 1x1 convolution's weights, packed once for the kernel of one level.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectConv {
    ci: usize,
    co: usize,
    /// Kernel size: 3 (padding 1) or 1 (no padding).
    k: usize,
    level: KernelLevel,
    tiling: Tiling,
    /// `[co / ocb][ci][k * k][ocb]`, zero-padded to whole blocks.
    packed: Vec<f32>,
    /// One value per output channel, zero-padded to whole blocks of both layouts.
    bias: Vec<f32>,
    /// The small-plane layout `[co / scb][ci][k * k][scb]`, packed from `packed` on first use.
    by_channel: std::sync::OnceLock<Vec<f32>>,
    /// 3x3 with enough input channels (`Tiling::winograd`) only: the Winograd F(2x2, 3x3)
    /// weights (None when [`WINOGRAD_ENV`] is `0`).
    winograd: Option<super::winograd::Weights>,
    /// Plane width (pixels) from which the Winograd weights are used.
    winograd_min_w: usize,
    /// 1, or 2 (3x3 only: [`DirectConv::strided`]).
    stride: usize,
}

/// Environment switch: `0` runs every 3x3 conv on the direct kernel instead of Winograd
/// F(2x2, 3x3) ([`super::winograd`]) where that is faster, and every int8 3x3 conv on the
/// direct int8 kernel instead of the exact F(4x4, 3x3) one ([`super::quant_winograd`]), to
/// measure what they change.
pub const WINOGRAD_ENV: &str = "DIFFSHIELD_WINOGRAD";

fn winograd_enabled() -> bool {
    super::switches::enabled(WINOGRAD_ENV, true)
}

impl DirectConv {
    /// True when `level` has a direct conv and this CPU runs it.
    pub fn available(level: KernelLevel) -> bool {
        Tiling::of(level).is_some() && level.supported()
    }

    /// [`DirectConv::strided`] at stride 1 (the tests' shorthand).
    #[cfg(test)]
    pub fn new(
        weights: &[f32],
        bias: &[f32],
        co: usize,
        ci: usize,
        k: usize,
        level: KernelLevel,
    ) -> Option<Self> {
        Self::strided(weights, bias, co, ci, k, 1, level)
    }

    /// Packs `weights` (OIHW, `co x ci x k x k`, k = 3 or 1) and `bias` (`co` values, or one
    /// value for all channels) for `level` at `stride` (1, or 2 for a 3x3 kernel). None for
    /// another k or stride, lengths that do not fit those shapes, or a level without a direct
    /// conv (tract). Strided convs always run on the small-plane layout, so they get no
    /// Winograd weights (F(2x2, 3x3) is for stride 1).
    pub fn strided(
        weights: &[f32],
        bias: &[f32],
        co: usize,
        ci: usize,
        k: usize,
        stride: usize,
        level: KernelLevel,
    ) -> Option<Self> {
        if !(stride == 1 || (stride == 2 && k == 3)) {
            return None;
        }
        let mut tiling = Tiling::of(level)?;
        // AVX-512's small-plane tile spans 64 channels; a conv with at most 32 outputs (the
        // first stride-2 conv of denoiser_s) would spend half its FMAs on padding channels,
        // so it gets a 32-channel tile (2 x 6 accumulators).
        if level == KernelLevel::Avx512 && co <= NARROW_SCB {
            tiling.scb = NARROW_SCB;
        }
        let (ocb, scb) = (tiling.ocb, tiling.scb);
        let taps = k * k;
        if co == 0 || ci == 0 || !(k == 1 || k == 3) || weights.len() != co * ci * taps {
            return None;
        }
        let bias_of = |o: usize| match bias.len() {
            1 => Some(bias[0]),
            n if n == co => Some(bias[o]),
            _ => None,
        };
        let mut padded_bias = vec![0f32; (co.div_ceil(scb) * scb).max(co.div_ceil(ocb) * ocb)];
        for (o, b) in padded_bias.iter_mut().enumerate().take(co) {
            *b = bias_of(o)?;
        }
        let mut packed = vec![0f32; co.div_ceil(ocb) * ci * taps * ocb];
        for o in 0..co {
            let (block, lane) = (o / ocb, o % ocb);
            for i in 0..ci {
                for tap in 0..taps {
                    packed[((block * ci + i) * taps + tap) * ocb + lane] =
                        weights[(o * ci + i) * taps + tap];
                }
            }
        }
        let winograd_min_w =
            tiling.winograd.iter().filter(|&&(_, min_ci)| ci >= min_ci).map(|&(w, _)| w).min();
        let winograd = (k == 3 && stride == 1 && winograd_min_w.is_some() && winograd_enabled())
            .then(|| super::winograd::Weights::new(weights, co, ci, ocb));
        Some(DirectConv {
            ci,
            co,
            k,
            level,
            tiling,
            packed,
            bias: padded_bias,
            by_channel: Default::default(),
            winograd,
            winograd_min_w: winograd_min_w.unwrap_or(usize::MAX),
            stride,
        })
    }

    /// The same conv with Winograd on every plane (`weights` as given to [`DirectConv::new`])
    /// or off.
    #[cfg(test)]
    pub(crate) fn with_winograd(mut self, weights: &[f32], on: bool) -> Self {
        self.winograd = (on && self.k == 3)
            .then(|| super::winograd::Weights::new(weights, self.co, self.ci, self.tiling.ocb));
        self.winograd_min_w = 1;
        self
    }
}

impl super::conv_kernel::ConvKernel for DirectConv {
    const NAME: &'static str = "DirectConv";

    fn shape(&self) -> super::conv_kernel::ConvShape {
        super::conv_kernel::ConvShape { ci: self.ci, co: self.co, k: self.k, stride: self.stride }
    }

    /// Convolves `x` (`n x ci x h x w`, contiguous NCHW) into `y` (`n x co x ho x wo`, the
    /// plane of [`super::conv_kernel::ConvShape::out_plane`]), adding
    /// `bias` (`co` values) instead of the packed one when given: tract folds per-call terms
    /// such as the denoiser's time embedding into a conv's bias.
    /// Errors when the slice lengths disagree with the shapes or the CPU cannot run the level.
    fn run(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), String> {
        if bias.is_some_and(|b| b.len() != self.co) {
            return Err(format!(
                "direct conv: a bias of {} values for {} channels",
                bias.map_or(0, <[f32]>::len),
                self.co
            ));
        }
        let (ho, wo) = super::conv_kernel::ConvKernel::shape(self).out_plane(h, w);
        if x.len() != n * self.ci * h * w || y.len() != n * self.co * ho * wo {
            return Err(format!(
                "direct conv: input of {} / output of {} values for n={n} ci={} co={} {h}x{w} \
                 stride {}",
                x.len(),
                y.len(),
                self.ci,
                self.co,
                self.stride
            ));
        }
        if !self.level.supported() {
            return Err(format!(
                "direct conv: this CPU cannot run the {} kernels",
                self.level.name()
            ));
        }
        if n * h * w == 0 {
            // No images or an empty plane: `y` is empty too (checked above), and the tilings
            // below divide by the image and pixel counts.
            return Ok(());
        }
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            scratch.bias.clear();
            if let Some(b) = bias {
                scratch.bias.extend_from_slice(&self.bias);
                scratch.bias[..self.co].copy_from_slice(b);
            }
            // Strided convs have no Winograd weights.
            let winograd = self.winograd.as_ref().filter(|_| w >= self.winograd_min_w);
            if let Some(weights) = winograd {
                let bias = if scratch.bias.is_empty() { &self.bias } else { &scratch.bias };
                let (level, lanes) = (self.level, self.tiling.lanes);
                super::winograd::conv(level, weights, bias, x, (n, h, w), y, lanes);
            } else if self.k == 3 && (self.stride != 1 || w < self.tiling.lanes) {
                self.small(x, n, h, w, y, scratch);
            } else {
                self.images(x, n, h, w, y, scratch);
            }
        });
        Ok(())
    }
}

thread_local! {
    /// Each thread's buffers, kept between calls: allocating and zeroing a fresh padded copy
    /// per conv was ~8 % of a frame (memset and page faults). A few MB at most per thread.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Buffers reused across images and calls; every call writes what it reads.
#[derive(Default)]
struct Scratch {
    /// Small planes: each output pixel's offset into `padded` (image and position).
    pixels: Vec<usize>,
    /// Small planes: the output pixel-major, `pixels x co` rounded up to whole tiles.
    by_pixel: Vec<f32>,
    /// The zero-padded input, per image `ci` planes of `(h + k - 1) x (w + k - 1)` plus slack
    /// for the flat mode.
    padded: Vec<f32>,
    /// Flat mode's output on the padded-width grid, per image `co` planes of whole vectors.
    wide: Vec<f32>,
    /// The call's bias padded to whole blocks; empty when the packed bias applies.
    bias: Vec<f32>,
}

impl DirectConv {
    /// `n` images (`x` is `n x ci x h x w`, `y` `n x co x h x w`), split over the pool of
    /// [`super::par`] by (image, output-channel block). The CPU runs `self.level` (checked by
    /// the caller).
    fn images(&self, x: &[f32], n: usize, h: usize, w: usize, y: &mut [f32], s: &mut Scratch) {
        let Tiling { lanes, ocb, .. } = self.tiling;
        let pad = self.k / 2;
        let wp = w + 2 * pad;
        let plane = (h + 2 * pad) * wp;
        // Layouts: `rows` (3x3, w a multiple of the vector) and `exact` (1x1 on whole vectors)
        // read and write pixels in place; the flat padded grid of the others computes
        // throw-away lanes into `wide` and copies the pixels out. A 1x1 conv needs no padding,
        // so `exact` reads `x` itself.
        let rows = pad > 0 && w.is_multiple_of(lanes);
        let exact = pad == 0 && (h * w).is_multiple_of(lanes);
        let (x_image, y_image) = (self.ci * h * w, self.co * h * w);
        // Flat mode reads up to 2 * wp + 2 + lanes - 1 past a vector start; slack keeps the
        // last plane's throw-away lanes inside each image's buffer.
        let padded_image = self.ci * plane + 2 * lanes;
        let (input, input_image) = if exact {
            (x.as_ptr(), x_image)
        } else {
            // The buffer is reused, so the padding ring and the slack are zeroed here, the
            // interior overwritten.
            if s.padded.len() < n * padded_image {
                s.padded.resize(n * padded_image, 0.0);
            }
            let padded = &mut s.padded[..n * padded_image];
            pad_images_on_pool(padded, x, (n, self.ci, h, w), pad, padded_image);
            (s.padded.as_ptr(), padded_image)
        };
        let in_place = rows || exact;
        // Flat planes are whole vectors long, so no vector spills into the next channel.
        let flat_vectors = (h * wp).div_ceil(lanes);
        let out_plane = if in_place { h * w } else { flat_vectors * lanes };
        let vectors = if rows { h * w / lanes } else { flat_vectors };
        let blocks = self.co.div_ceil(ocb);
        // Every lane of `wide` that is copied out is written first: no zeroing needed.
        let wide_image = if in_place { 0 } else { blocks * ocb * out_plane };
        if s.wide.len() < n * wide_image {
            s.wide.resize(n * wide_image, 0.0);
        }
        let pass = Pass {
            input: SyncPtr::of(input),
            input_image,
            out: SyncPtr(if in_place { y.as_mut_ptr() } else { s.wide.as_mut_ptr() }),
            out_image: if in_place { y_image } else { wide_image },
            out_plane,
            y: SyncPtr(y.as_mut_ptr()),
            bias: SyncPtr::of(if s.bias.is_empty() { self.bias.as_ptr() } else { s.bias.as_ptr() }),
            rows,
            in_place,
            h,
            w,
            wp,
            plane,
            vectors,
        };
        super::par::for_each(n * blocks, |item| {
            let (b, block) = (item / blocks, item % blocks);
            // SAFETY: the caller checked that the CPU runs the level; item (image, block)
            // reads the image's input and writes only its block's output channels (in `wide`
            // and `y`), all inside the buffers sized above.
            unsafe {
                match self.level {
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512 => self.block_avx512(&pass, b, block),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx2 => self.block_avx2(&pass, b, block),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::PortableFma => self.block_portable_fma(&pass, b, block),
                    KernelLevel::Portable => {
                        self.block::<Portable, PORTABLE_OCB, 2>(&pass, b, block)
                    }
                    _ => unreachable!("a DirectConv is only built for levels with a tiling"),
                }
            }
        });
    }

    /// [`DirectConv::block`] on AVX-512's tile: 8 output channels x 3 pixel vectors.
    /// Safety: the CPU supports AVX-512F; `self` is packed for the avx512 level, and `pass`,
    /// `b`, `block` are as [`DirectConv::images`] makes them (one item per image and block).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_avx512(&self, pass: &Pass, b: usize, block: usize) {
        self.block::<Avx512, 8, 3>(pass, b, block)
    }

    /// [`DirectConv::block`] on AVX2's tile: 4 output channels x 2 pixel vectors.
    /// Safety: the CPU supports AVX2 and FMA; `self` is packed for the avx2 level, and `pass`,
    /// `b`, `block` are as [`DirectConv::images`] makes them (one item per image and block).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(&self, pass: &Pass, b: usize, block: usize) {
        self.block::<Avx2, 4, 2>(pass, b, block)
    }

    /// [`DirectConv::block`] on [`PortableFma`] vectors, compiled for AVX2 + FMA: 4 output
    /// channels x 2 pixel vectors.
    /// Safety: the CPU supports AVX2 and FMA; `self` is packed for the portable-fma level, and
    /// `pass`, `b`, `block` are as [`DirectConv::images`] makes them (one item per image and
    /// block).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_portable_fma(&self, pass: &Pass, b: usize, block: usize) {
        self.block::<PortableFma, { PORTABLE_FMA.ocb }, 2>(pass, b, block)
    }

    /// Output channels `block * OCB ..` of image `b`, copied out of `wide` in flat mode.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it; `pass` describes
    /// buffers of the sizes [`DirectConv::images`] gives them.
    #[inline(always)]
    unsafe fn block<S: Simd, const OCB: usize, const PV: usize>(
        &self,
        pass: &Pass,
        b: usize,
        block: usize,
    ) {
        let Pass { rows, in_place, h, w, wp, vectors, out_plane, .. } = *pass;
        let lanes = S::LANES;
        // Vector k's (input offset of its top-left tap, output offset).
        let position = |k: usize| {
            if rows {
                let (r, c) = (k / (w / lanes), (k % (w / lanes)) * lanes);
                (r * wp + c, r * w + c)
            } else {
                (k * lanes, k * lanes)
            }
        };
        let out = pass.out.ptr().add(b * pass.out_image + block * OCB * out_plane);
        let tile = Tile {
            x: pass.input.ptr().add(b * pass.input_image).cast_const(),
            plane: pass.plane,
            wp,
            ci: self.ci,
            w: self.packed.as_ptr().add(block * self.ci * self.k * self.k * OCB),
            bias: pass.bias.ptr().add(block * OCB).cast_const(),
            out,
            out_stride: out_plane,
            // `y` has no padding channels; `wide` has whole blocks.
            channels: if in_place { (self.co - block * OCB).min(OCB) } else { OCB },
        };
        let mut k = 0;
        while k + PV <= vectors {
            let at: [(usize, usize); PV] = std::array::from_fn(|j| position(k + j));
            tile.taps::<S, OCB, PV>(self.k, at.map(|p| p.0), at.map(|p| p.1));
            k += PV;
        }
        // Fewer than PV (at most 3) vectors remain.
        if k + 2 == vectors {
            let at: [(usize, usize); 2] = std::array::from_fn(|j| position(k + j));
            tile.taps::<S, OCB, 2>(self.k, at.map(|p| p.0), at.map(|p| p.1));
        } else if k + 1 == vectors {
            let (i0, o0) = position(k);
            tile.taps::<S, OCB, 1>(self.k, [i0], [o0]);
        }
        if !in_place {
            let y = pass.y.ptr().add(b * self.co * h * w);
            for o in block * OCB..(block * OCB + OCB).min(self.co) {
                for r in 0..h {
                    let src = out.add((o - block * OCB) * out_plane + r * wp);
                    std::ptr::copy_nonoverlapping(src, y.add((o * h + r) * w), w);
                }
            }
        }
    }
}

/// What every (image, block) item of [`DirectConv::images`] shares.
struct Pass {
    /// Each image's input (padded unless in place), `input_image` values apart.
    input: SyncPtr<f32>,
    input_image: usize,
    /// Each image's output (`y` in place, else `wide`), `out_image` values apart, channel
    /// planes `out_plane` apart.
    out: SyncPtr<f32>,
    out_image: usize,
    out_plane: usize,
    /// The final output when results are copied out of `wide`.
    y: SyncPtr<f32>,
    bias: SyncPtr<f32>,
    rows: bool,
    in_place: bool,
    h: usize,
    w: usize,
    wp: usize,
    plane: usize,
    vectors: usize,
}

impl DirectConv {
    /// The weights as `[co / scb][ci][k * k][scb]` (zero-padded channels), packed once.
    fn by_channel(&self) -> &[f32] {
        self.by_channel.get_or_init(|| {
            let Tiling { ocb, scb, .. } = self.tiling;
            let taps = self.k * self.k;
            let mut out = vec![0f32; self.co.div_ceil(scb) * self.ci * taps * scb];
            for o in 0..self.co {
                for i in 0..self.ci {
                    for t in 0..taps {
                        out[((o / scb * self.ci + i) * taps + t) * scb + o % scb] =
                            self.packed[((o / ocb * self.ci + i) * taps + t) * ocb + o % ocb];
                    }
                }
            }
            out
        })
    }

    /// A 3x3 conv on planes narrower than a vector (the classifier's 8x8 and 4x4 levels) or at
    /// stride 2, all `n` images at once. The pixel-vector layouts would leave a third to a half
    /// of the lanes on padding there and reload all weights per image; here the vectors run
    /// along output channels (`scb` per tile), `spt` pixels of any image are broadcast against
    /// them, and the pixel-major result is transposed into `y` at the end. `x` is
    /// `n x ci x h x w`, `y` `n x co x ho x wo` (`out_plane`); the CPU runs `self.level`
    /// (checked by the caller).
    fn small(&self, x: &[f32], n: usize, h: usize, w: usize, y: &mut [f32], s: &mut Scratch) {
        let wp = w + 2;
        let plane = (h + 2) * wp;
        let len = n * self.ci * plane;
        if s.padded.len() < len {
            s.padded.resize(len, 0.0);
        }
        pad_images_on_pool(&mut s.padded[..len], x, (n, self.ci, h, w), 1, self.ci * plane);
        // Output pixel (r, c) reads the padded rows from `stride * r`, columns from
        // `stride * c`: with padding 1 the last one read is row `stride * (ho - 1) + 2 <= h + 1`.
        let (ho, wo) = super::conv_kernel::ConvKernel::shape(self).out_plane(h, w);
        let stride = self.stride;
        s.pixels.clear();
        for b in 0..n {
            for r in 0..ho {
                for c in 0..wo {
                    s.pixels.push(b * self.ci * plane + stride * (r * wp + c));
                }
            }
        }
        let Tiling { scb, spt, .. } = self.tiling;
        let blocks = self.co.div_ceil(scb);
        let width = blocks * scb;
        let count = n * ho * wo;
        if s.by_pixel.len() < count * width {
            s.by_pixel.resize(count * width, 0.0);
        }
        // Both the packed bias and the call's copy of it are padded to whole blocks.
        let bias = if s.bias.is_empty() { self.bias.as_ptr() } else { s.bias.as_ptr() };
        let weights = SyncPtr::of(self.by_channel().as_ptr());
        let taps = [0, 1, 2, wp, wp + 1, wp + 2, 2 * wp, 2 * wp + 1, 2 * wp + 2];
        // Items are (channel block, run of pixel tiles); one thread keeps one run per block so
        // that a chunk's weights stay in L1 over all pixels. Every output value still sums its
        // input chunks in the same order.
        let tiles = count.div_ceil(spt);
        let threads = super::par::threads();
        let runs = if threads == 1 { 1 } else { (4 * threads).div_ceil(blocks).min(tiles) };
        let run_tiles = tiles.div_ceil(runs);
        let runs = tiles.div_ceil(run_tiles);
        let (padded, pixels) = (SyncPtr::of(s.padded.as_ptr()), SyncPtr::of(s.pixels.as_ptr()));
        let (bias, out) = (SyncPtr::of(bias), SyncPtr(s.by_pixel.as_mut_ptr()));
        super::par::for_each(blocks * runs, |item| {
            let (block, run) = (item / runs, item % runs);
            // SAFETY: every pointer is into a buffer sized above for `count` pixels and
            // `blocks` channel blocks; the item writes only the rows of its own pixels in its
            // own block's columns of `by_pixel`.
            unsafe {
                let tile = ChannelTile {
                    x: padded.ptr().cast_const(),
                    plane,
                    w: weights.ptr().add(block * self.ci * 9 * scb).cast_const(),
                    bias: bias.ptr().add(block * scb).cast_const(),
                    out: out.ptr().add(block * scb),
                    width,
                    ci: self.ci,
                };
                let pixels = std::slice::from_raw_parts(pixels.ptr().cast_const(), count);
                let run = run * run_tiles * spt..((run + 1) * run_tiles * spt).min(count);
                // SAFETY (continued): the caller checked that the CPU runs the level.
                match self.level {
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512 if scb == NARROW_SCB => {
                        tile.pixels_avx512_narrow(&taps, pixels, run)
                    }
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512 => tile.pixels_avx512(&taps, pixels, run),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx2 => tile.pixels_avx2(&taps, pixels, run),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::PortableFma => tile.pixels_portable_fma(&taps, pixels, run),
                    KernelLevel::Portable => tile
                        .pixels::<Portable, { PORTABLE.scb / PORTABLE.lanes }, { PORTABLE.spt }>(
                            &taps, pixels, run,
                        ),
                    _ => unreachable!("a DirectConv is only built for levels with a tiling"),
                }
            }
        });
        // The transpose is split by plane over the pool, as the padding is.
        let hw = ho * wo;
        let (by_pixel, planes) = (&s.by_pixel, SyncPtr(y.as_mut_ptr()));
        super::par::for_each(n * self.co, |q| {
            let (b, o) = (q / self.co, q % self.co);
            // SAFETY: `y` holds `n * co` planes of `hw` (checked by `run`); item `q` writes
            // only plane `q`.
            let out = unsafe { std::slice::from_raw_parts_mut(planes.ptr().add(q * hw), hw) };
            for (p, v) in out.iter_mut().enumerate() {
                *v = by_pixel[(b * hw + p) * width + o];
            }
        });
    }
}

/// One channel block of the small-plane layout.
struct ChannelTile {
    x: *const f32,
    plane: usize,
    w: *const f32,
    bias: *const f32,
    out: *mut f32,
    /// Row length of `out` (all channel blocks).
    width: usize,
    ci: usize,
}

impl ChannelTile {
    /// [`ChannelTile::pixels`] on AVX-512's tile: 64 output channels (4 vectors) x 6 pixels.
    /// Safety: the CPU supports AVX-512F; `self` is a 64-channel block and `taps`, `pixels`,
    /// `run` are as [`DirectConv::small`] makes them (runs of whole 6-pixel tiles, one item
    /// each).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn pixels_avx512(
        &self,
        taps: &[usize; 9],
        pixels: &[usize],
        run: std::ops::Range<usize>,
    ) {
        self.pixels::<Avx512, 4, 6>(taps, pixels, run)
    }

    /// [`ChannelTile::pixels`] on AVX-512's narrow tile: [`NARROW_SCB`] output channels (2
    /// vectors) x 6 pixels.
    /// Safety: the CPU supports AVX-512F; `self` is a [`NARROW_SCB`]-channel block and `taps`,
    /// `pixels`, `run` are as [`DirectConv::small`] makes them (runs of whole 6-pixel tiles, one
    /// item each).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn pixels_avx512_narrow(
        &self,
        taps: &[usize; 9],
        pixels: &[usize],
        run: std::ops::Range<usize>,
    ) {
        self.pixels::<Avx512, { NARROW_SCB / 16 }, 6>(taps, pixels, run)
    }

    /// [`ChannelTile::pixels`] on AVX2's tile: 16 output channels (2 vectors) x 4 pixels.
    /// Safety: the CPU supports AVX2 and FMA; `self` is a 16-channel block and `taps`, `pixels`,
    /// `run` are as [`DirectConv::small`] makes them (runs of whole 4-pixel tiles, one item
    /// each).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pixels_avx2(&self, taps: &[usize; 9], pixels: &[usize], run: std::ops::Range<usize>) {
        self.pixels::<Avx2, 2, 4>(taps, pixels, run)
    }

    /// [`ChannelTile::pixels`] on [`PortableFma`] vectors, compiled for AVX2 + FMA: 16 output
    /// channels (2 vectors) x 4 pixels.
    /// Safety: the CPU supports AVX2 and FMA; `self` is a 16-channel block and `taps`, `pixels`,
    /// `run` are as [`DirectConv::small`] makes them (runs of whole 4-pixel tiles, one item
    /// each).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pixels_portable_fma(
        &self,
        taps: &[usize; 9],
        pixels: &[usize],
        run: std::ops::Range<usize>,
    ) {
        self.pixels::<PortableFma, { PORTABLE_FMA.scb / PORTABLE_FMA.lanes }, { PORTABLE_FMA.spt }>(
            taps, pixels, run,
        )
    }

    /// The output pixels `run` (indices into `pixels`), all input channels in chunks of
    /// [`SCI`], `V` vectors of output channels x up to `SPT` pixels per tile.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it, with the buffers
    /// of [`DirectConv::small`].
    #[inline(always)]
    unsafe fn pixels<S: Simd, const V: usize, const SPT: usize>(
        &self,
        taps: &[usize; 9],
        pixels: &[usize],
        run: std::ops::Range<usize>,
    ) {
        let count = pixels.len();
        for inputs in (0..self.ci).step_by(SCI) {
            let inputs = inputs..(inputs + SCI).min(self.ci);
            for first in run.clone().step_by(SPT) {
                let p = &pixels[first..(first + SPT).min(count)];
                let (i, lead) = (inputs.clone(), first == run.start);
                // SPT is at most 6.
                match p.len() {
                    n if n == SPT => self.run::<S, V, SPT>(taps, p, first, i, lead),
                    1 => self.run::<S, V, 1>(taps, p, first, i, lead),
                    2 => self.run::<S, V, 2>(taps, p, first, i, lead),
                    3 => self.run::<S, V, 3>(taps, p, first, i, lead),
                    4 => self.run::<S, V, 4>(taps, p, first, i, lead),
                    _ => self.run::<S, V, 5>(taps, p, first, i, lead),
                }
            }
        }
    }

    /// Adds the input channels `inputs` (all taps) to the pixels at padded offsets `pixels`
    /// (`N` of them, output rows `first ..`), `V` vectors of output channels in registers. The
    /// first chunk starts from the bias, later ones from the partial sums in `out`. The first
    /// pixel tile of a run (`lead`) also prefetches the next chunk's weights (same size, right
    /// after this one in memory) into L2: at batch 1 the weights are the traffic that limits
    /// these convs.
    /// Safety: as [`ChannelTile::pixels`]: `V * S::LANES` is the block's width (the `scb` of
    /// its weights and bias), `pixels` starts with `N` padded offsets, `inputs.end <= self.ci`,
    /// and rows `first .. first + N` of the block's columns of `self.out` are this item's alone.
    #[inline(always)]
    unsafe fn run<S: Simd, const V: usize, const N: usize>(
        &self,
        taps: &[usize; 9],
        pixels: &[usize],
        first: usize,
        inputs: std::ops::Range<usize>,
        lead: bool,
    ) {
        let scb = V * S::LANES;
        let at: [usize; N] = std::array::from_fn(|p| pixels[p]);
        let mut acc = [[S::zero(); V]; N];
        for (p, row) in acc.iter_mut().enumerate() {
            let from = if inputs.start == 0 {
                self.bias
            } else {
                self.out.add((first + p) * self.width).cast_const()
            };
            for (v, a) in row.iter_mut().enumerate() {
                *a = S::load(from.add(v * S::LANES));
            }
        }
        let next = self.w.wrapping_add(inputs.end * 9 * scb);
        let start = inputs.start;
        for i in inputs {
            let xi = self.x.add(i * self.plane);
            let wi = self.w.add(i * 9 * scb);
            for (t, &tap) in taps.iter().enumerate() {
                if lead {
                    // Past the last chunk this prefetches nothing useful, which is harmless.
                    let line = next.wrapping_add(((i - start) * 9 + t) * scb);
                    for v in 0..V {
                        S::prefetch_l2(line.wrapping_add(v * S::LANES));
                    }
                }
                let mut wv = [S::zero(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = S::load(wi.add(t * scb + v * S::LANES));
                }
                for (p, row) in acc.iter_mut().enumerate() {
                    let xv = S::splat(*xi.add(at[p] + tap));
                    for v in 0..V {
                        row[v] = S::fma(wv[v], xv, row[v]);
                    }
                }
            }
        }
        for (p, row) in acc.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                S::store(self.out.add((first + p) * self.width + v * S::LANES), a);
            }
        }
    }
}

/// Copies the `h x w` planes of `x` into the `(h + 2 pad) x (w + 2 pad)` planes of `dst` with a
/// ring of `pad` zeros (every value of `dst` is written: the buffer is reused between calls).
fn pad_planes(dst: &mut [f32], x: &[f32], h: usize, w: usize, pad: usize) {
    let wp = w + 2 * pad;
    for (p, src) in dst.chunks_exact_mut((h + 2 * pad) * wp).zip(x.chunks_exact(h * w)) {
        p[..pad * wp].fill(0.0);
        p[(h + pad) * wp..].fill(0.0);
        for (r, src_row) in src.chunks_exact(w).enumerate() {
            let row = &mut p[(r + pad) * wp..(r + pad + 1) * wp];
            row[..pad].fill(0.0);
            row[pad + w..].fill(0.0);
            row[pad..pad + w].copy_from_slice(src_row);
        }
    }
}

/// Pads the `n x ci` planes of `x` (`h x w` each) with [`pad_planes`] into `dst`, image `b`'s
/// planes from `b * image` on and the rest of each image (slack, `image` past its `ci` padded
/// planes) zeroed, one plane per item of the pool: on one thread these copies were a fifth of a
/// stride-2 conv at two threads.
fn pad_images_on_pool(
    dst: &mut [f32],
    x: &[f32],
    (n, ci, h, w): (usize, usize, usize, usize),
    pad: usize,
    image: usize,
) {
    let plane = (h + 2 * pad) * (w + 2 * pad);
    assert!(ci > 0 && image >= ci * plane && dst.len() >= n * image && x.len() >= n * ci * h * w);
    let out = SyncPtr(dst.as_mut_ptr());
    super::par::for_each(n * ci, |q| {
        let (b, i) = (q / ci, q % ci);
        let len = if i + 1 == ci { image - i * plane } else { plane };
        // SAFETY: `dst` holds `n` images of `image` values (asserted); item `q` writes only
        // plane `i` of image `b` (the last plane's item also that image's slack).
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.ptr().add(b * image + i * plane), len) };
        pad_planes(&mut dst[..plane], &x[q * h * w..(q + 1) * h * w], h, w, pad);
        dst[plane..].fill(0.0);
    });
}

/// One output-channel block's view of the buffers. Also the matrix product of
/// [`super::winograd`] (a 1x1 conv over its transformed tiles).
pub(super) struct Tile {
    /// The input: channel `i`'s values start `i * plane` past it.
    pub(super) x: *const f32,
    pub(super) plane: usize,
    /// Padded row length (3x3 taps only).
    pub(super) wp: usize,
    pub(super) ci: usize,
    /// The block's packed weights, `[ci][taps][OCB]`.
    pub(super) w: *const f32,
    /// `OCB` starting values of the sums.
    pub(super) bias: *const f32,
    /// The output: channel `j`'s values start `j * out_stride` past it.
    pub(super) out: *mut f32,
    pub(super) out_stride: usize,
    /// Channels stored (the rest of the block is padding).
    pub(super) channels: usize,
}

impl Tile {
    /// [`Tile::run`] with the tap offsets of a `k x k` kernel (3 or 1).
    /// Safety: as [`Tile::run`] for these taps: for k = 3, each input vector is readable up to
    /// `2 * self.wp + 2` values past its offset.
    #[inline(always)]
    unsafe fn taps<S: Simd, const OCB: usize, const N: usize>(
        &self,
        k: usize,
        input: [usize; N],
        output: [usize; N],
    ) {
        let wp = self.wp;
        if k == 3 {
            let taps = [0, 1, 2, wp, wp + 1, wp + 2, 2 * wp, 2 * wp + 1, 2 * wp + 2];
            self.run::<S, OCB, N, 9>(taps, input, output)
        } else {
            self.run::<S, OCB, N, 1>([0], input, output)
        }
    }

    /// Accumulates `N` pixel vectors of `OCB` output channels over `T` taps in registers and
    /// stores them.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it; the pointers hold
    /// what the fields say for these offsets.
    #[inline(always)]
    pub(super) unsafe fn run<S: Simd, const OCB: usize, const N: usize, const T: usize>(
        &self,
        taps: [usize; T],
        input: [usize; N],
        output: [usize; N],
    ) {
        let mut acc = [[S::zero(); N]; OCB];
        for (j, row) in acc.iter_mut().enumerate() {
            *row = [S::splat(*self.bias.add(j)); N];
        }
        for i in 0..self.ci {
            let xi = self.x.add(i * self.plane);
            let wi = self.w.add(i * T * OCB);
            for (t, &tap) in taps.iter().enumerate() {
                let mut xv = [S::zero(); N];
                for p in 0..N {
                    xv[p] = S::load(xi.add(input[p] + tap));
                }
                for (j, row) in acc.iter_mut().enumerate() {
                    let wv = S::splat(*wi.add(t * OCB + j));
                    for p in 0..N {
                        row[p] = S::fma(wv, xv[p], row[p]);
                    }
                }
            }
        }
        for (j, row) in acc.iter().enumerate().take(self.channels) {
            for p in 0..N {
                S::store(self.out.add(j * self.out_stride + output[p]), row[p]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conv_kernel::ConvKernel;
    use crate::backend::test_values::{reference_conv, values};

    /// [`reference_conv`] of each of the `n` images of `x` in turn, in f64.
    fn reference_images(
        x: &[f32],
        (n, ci, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        (co, k): (usize, usize),
    ) -> Vec<f64> {
        let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let (wt, bias) = (f64s(wt), f64s(bias));
        x.chunks_exact(ci * h * w)
            .take(n)
            .flat_map(|image| reference_conv(&f64s(image), (ci, h, w), &wt, &bias, (co, k)))
            .collect()
    }

    /// The levels with a direct conv among those under test.
    fn levels() -> Vec<KernelLevel> {
        let levels = crate::backend::simd::levels_under_test();
        for level in &levels {
            if Tiling::of(*level).is_none() {
                println!("direct conv: level {} has none (tract's convs run there)", level.name());
            }
        }
        levels.into_iter().filter(|l| Tiling::of(*l).is_some()).collect()
    }

    #[test]
    fn matches_the_reference_on_row_and_flat_layouts_on_every_level() {
        // (n, co, ci, h, w): rows mode (w a multiple of the vector), flat mode (1x1, and 3x3 at
        // w = 20 and 12), the small-plane mode (3x3 at w < the vector, pixel tiles across
        // images), partial channel blocks (co = 3, 7, 9, 13, 80), batches of 2 and 3, planes
        // one pixel wide or high, each for 3x3 and 1x1 kernels; 3x3 also with Winograd on every
        // plane (odd sizes, partial tiles, items spanning images).
        let shapes = [
            (1, 7, 6, 5, 12),
            (2, 5, 3, 17, 19),
            (1, 16, 8, 33, 32),
            (2, 6, 5, 9, 35),
            (1, 32, 32, 32, 32),
            (2, 13, 7, 16, 16),
            (1, 16, 24, 8, 8),
            (2, 3, 5, 5, 5),
            (1, 9, 4, 6, 20),
            (1, 24, 16, 4, 4),
            (3, 80, 40, 4, 4),
            (2, 64, 33, 8, 8),
            (2, 5, 3, 1, 1),
            (1, 4, 3, 1, 19),
            (2, 3, 2, 6, 1),
        ];
        for (level, k) in levels().into_iter().flat_map(|l| [(l, 3), (l, 1)]) {
            for &(n, co, ci, h, w) in &shapes {
                let x = values(n * ci * h * w, 1);
                let wt: Vec<f32> = values(co * ci * k * k, 2).iter().map(|v| v * 0.2).collect();
                let bias = values(co, 3);
                for winograd in [false, true] {
                    let conv = DirectConv::new(&wt, &bias, co, ci, k, level)
                        .expect("shapes fit")
                        .with_winograd(&wt, winograd);
                    let [y, y2, y3] = crate::backend::par::on_thread_counts(|| {
                        let mut y = vec![f32::NAN; n * co * h * w];
                        conv.run(&x, n, h, w, None, &mut y).expect("runs");
                        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    });
                    let case = format!(
                        "{} k{k} ({n},{co},{ci},{h},{w}) winograd {winograd}",
                        level.name()
                    );
                    assert!(y == y2 && y == y3, "{case}: thread counts change the bits");
                    let want = reference_images(&x, (n, ci, h, w), &wt, &bias, (co, k));
                    assert_eq!(y.len(), want.len(), "{case}");
                    for (i, (&g, &r)) in y.iter().zip(&want).enumerate() {
                        let (b, i) = (i / (co * h * w), i % (co * h * w));
                        let case = format!("{case} image {b} value {i}");
                        let g = f32::from_bits(g) as f64;
                        assert!((g - r).abs() <= 1e-5 * (1.0 + r.abs()), "{case}: {g} vs {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn stride_two_matches_the_subsampled_reference_on_every_level() {
        // (n, co, ci, h, w): the denoisers' two downsampling convs (32 and 64 channels), odd
        // planes (the last output row and column read the padding ring), a 1x1 plane, partial
        // channel blocks and pixel tiles, batches of 2 and 3.
        let shapes = [
            (2, 32, 32, 32, 32),
            (1, 64, 64, 16, 16),
            (3, 13, 5, 9, 7),
            (1, 80, 17, 6, 10),
            (2, 5, 3, 1, 1),
            (2, 7, 4, 3, 8),
        ];
        for level in levels() {
            for &(n, co, ci, h, w) in &shapes {
                let x = values(n * ci * h * w, 4);
                let wt: Vec<f32> = values(co * ci * 9, 5).iter().map(|v| v * 0.2).collect();
                let bias = values(co, 6);
                let conv =
                    DirectConv::strided(&wt, &bias, co, ci, 3, 2, level).expect("shapes fit");
                assert!(
                    conv.winograd.is_none(),
                    "{}: strided convs pack no Winograd weights",
                    level.name()
                );
                let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
                assert_eq!(conv.shape().out_plane(h, w), (ho, wo));
                let case = format!("{} stride 2 ({n},{co},{ci},{h},{w})", level.name());
                let mut short = vec![0.0; n * co * h * w];
                if ho * wo != h * w {
                    assert!(conv.run(&x, n, h, w, None, &mut short).is_err(), "{case}");
                }
                let [y, y2, y3] = crate::backend::par::on_thread_counts(|| {
                    let mut y = vec![f32::NAN; n * co * ho * wo];
                    conv.run(&x, n, h, w, None, &mut y).expect("runs");
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                });
                assert!(y == y2 && y == y3, "{case}: thread counts change the bits");
                // Stride 2 with padding 1 is the stride-1 result at even rows and columns.
                let full = reference_images(&x, (n, ci, h, w), &wt, &bias, (co, 3));
                for b in 0..n {
                    for o in 0..co {
                        for r in 0..ho {
                            for c in 0..wo {
                                let want = full[((b * co + o) * h + 2 * r) * w + 2 * c];
                                let got = f32::from_bits(y[((b * co + o) * ho + r) * wo + c]);
                                let got = got as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "{case} image {b} channel {o} ({r},{c}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
        let strided = |k, stride| {
            DirectConv::strided(
                &vec![0.0; 2 * k * k],
                &[0.0; 2],
                2,
                1,
                k,
                stride,
                KernelLevel::Portable,
            )
        };
        assert!(strided(1, 2).is_none(), "1x1 convs have no strided kernel");
        assert!(strided(3, 3).is_none(), "3x3 convs have strides 1 and 2 only");
        assert!(strided(1, 1).is_some() && strided(3, 2).is_some());
    }

    #[test]
    fn empty_batches_and_planes_are_no_work_on_every_level() {
        // The tilings divide by image and pixel counts, so none of them may see an empty
        // input: it returns at once, with an output as empty as the input.
        for level in levels() {
            let wt = values(2 * 3 * 9, 1);
            let convs = [
                DirectConv::new(&wt, &[0.5], 2, 3, 3, level),
                DirectConv::new(&wt, &[0.5], 2, 3, 3, level).map(|c| c.with_winograd(&wt, true)),
                DirectConv::strided(&wt, &[0.5], 2, 3, 3, 2, level),
                DirectConv::new(&wt[..6], &[0.5], 2, 3, 1, level),
            ];
            for conv in convs {
                let conv = conv.expect("shapes fit");
                for (n, h, w) in [(0, 4, 4), (1, 0, 4), (2, 4, 0), (2, 0, 0)] {
                    let (ho, wo) = conv.shape().out_plane(h, w);
                    let case = format!("{} {:?} n={n} {h}x{w}", level.name(), conv.shape());
                    assert_eq!(n * ho * wo, 0, "{case}: an empty input makes an empty output");
                    let x = vec![0.0; n * 3 * h * w];
                    conv.run(&x, n, h, w, None, &mut []).expect(&case);
                    assert!(conv.run(&x, n, h, w, None, &mut [0.0]).is_err(), "{case}");
                }
            }
        }
    }

    #[test]
    fn refuses_mismatched_shapes_and_levels_without_a_kernel() {
        use KernelLevel::*;
        assert!(DirectConv::new(&[0.0; 18], &[0.5], 2, 1, 3, Tract).is_none());
        for level in [Avx512, Avx2, PortableFma, Portable] {
            assert!(DirectConv::new(&[0.0; 17], &[0.0; 2], 2, 1, 3, level).is_none());
            assert!(DirectConv::new(&[0.0; 18], &[0.0; 3], 2, 1, 3, level).is_none());
            assert!(DirectConv::new(&[0.0; 50], &[0.0; 2], 2, 1, 5, level).is_none());
            let conv = DirectConv::new(&[0.0; 18], &[0.5], 2, 1, 3, level).expect("scalar bias");
            let mut y = vec![0.0; 2 * 4 * 4];
            assert!(conv.run(&[0.0; 15], 1, 4, 4, None, &mut y).is_err());
            if !level.supported() {
                let err = conv.run(&[0.0; 16], 1, 4, 4, None, &mut y).unwrap_err();
                assert!(err.contains("cannot run"), "{err}");
                continue;
            }
            assert!(conv.run(&[0.0; 16], 1, 4, 4, Some(&[1.0]), &mut y).is_err());
            conv.run(&[0.0; 16], 1, 4, 4, Some(&[1.0, 2.0]), &mut y).expect("run-time bias");
            assert!(y[..16].iter().all(|&v| v == 1.0) && y[16..].iter().all(|&v| v == 2.0));
        }
    }
}
