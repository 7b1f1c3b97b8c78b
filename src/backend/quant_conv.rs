//! Direct int8 3x3 (padding 1) and 1x1 convolutions, stride 1, NCHW, for x86-64 CPUs with
//! AVX-512 VNNI: f32 in, u8 activations x s8 weights with i32 sums (`vpdpbusd`), f32 out.
//!
//! Why it exists: tract 0.23.9 runs every `QLinearConv` as an eager u8 im2col, an int8 matmul,
//! a scalar `QuantizeLinear` before it and a `DequantizeLinear` after it, so the int8 denoiser
//! ran at 0.45x our f32 direct conv although this CPU multiplies 4x as many int8 values per
//! instruction. The input is quantized (the model's scale and zero point) into planes whose
//! 32-bit words hold four consecutive input channels of one pixel, an 8-output-channel x
//! 3-pixel-vector tile of i32 accumulators takes one `vpdpbusd` per four input channels
//! (weights broadcast as four s8 in a word), and the sums are dequantized in registers, with
//! the bias folded in, straight into the NCHW output.
//!
//! Row layout: a plane holds the image's rows back to back, `w` words each, with one row of
//! the zero point above and below for 3x3 kernels but no padding columns. A vector of 16
//! output pixels may span rows; the taps that look left (right) of a row's first (last)
//! pixel are zeroed by a load mask instead of reading a padding column, and the zero point's
//! share they then miss is added back with the bias (a per-channel constant for the first and
//! for the last column). Padding columns (the flat layout this replaced: `w + 2` words a row)
//! cost 6 / 12.5 / 25 % more `vpdpbusd`s at widths 32 / 16 / 8, and an i32 scratch pass.
//!
//! Semantics: the input quantization is exactly the model's `QuantizeLinear` (u8, round to
//! nearest, saturating); the weights and the bias are the model's int8 and int32 values; the
//! output is the exact dequantized i32 sum in f32, i.e. the conv's `QuantizeLinear` /
//! `DequantizeLinear` round trip on the output (the model's y scale) is skipped. That makes the
//! op closer to the float network than the QOperator graph is, never further.
//!
//! 3x3 convs from 64 input channels run on the exact integer Winograd kernel of
//! [`super::quant_winograd`] where it pays ([`QuantConv::with_winograd_for`], and at run time
//! from 12 tiles a thread): the same integer sums and the same output bits as this kernel's.

// The kernel is x86-64 only; elsewhere its types are type-checked but never run.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::conv_kernel::Addend;
#[cfg(target_arch = "x86_64")]
use super::par::SyncPtr;

/// Output channels per register tile.
const OCB: usize = 8;
/// Pixel vectors per register tile (each 16 lanes of i32).
const PV: usize = 3;
/// Lanes of one AVX-512 vector of i32 / f32.
const LANES: usize = 16;
/// Input channels per 32-bit word (one `vpdpbusd` lane).
const GROUP: usize = 4;

/// How the input of a quantized conv is quantized: `q = clamp(round(x * inv_scale) + zero, 0,
/// 255)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputQuant {
    /// 1 / the input scale (what tract's `QuantizeLinearU8` stores).
    pub inv_scale: f32,
    /// The input zero point (u8).
    pub zero: u8,
}

/// A 3x3 or 1x1 int8 convolution's weights, packed once for the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConv {
    ci: usize,
    co: usize,
    k: usize,
    input: InputQuant,
    /// `[co / OCB][ci / GROUP][k * k][OCB]` words of four s8 weights (input channels 4g..4g+3).
    packed: Vec<i32>,
    /// Per output channel: input scale x weight scale (f32 per unit of the i32 sum).
    multiplier: Vec<f32>,
    /// Per output channel, the bias in f32 minus the zero point's share of the sum, for a
    /// pixel in the interior, the first column, the last column, and both (`w` = 1): the
    /// edge columns' left (right) taps are masked out, so less of that share is in the sum.
    offset: Vec<[f32; 4]>,
    /// The exact Winograd F(4x4, 3x3) form of a 3x3 conv where that kernel takes it
    /// ([`super::quant_winograd`]): the same bits from half the instructions.
    winograd: Option<super::quant_winograd::Weights>,
}

impl QuantConv {
    /// True when this CPU can run the kernel (x86-64 with AVX-512F and AVX-512 VNNI, detected
    /// at run time).
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// True when `level` runs this kernel here: level avx512 on a CPU with AVX-512 VNNI.
    pub fn available(level: super::simd::KernelLevel) -> bool {
        level == super::simd::KernelLevel::Avx512 && Self::supported()
    }

    /// Packs `weights` (OIHW s8, `co x ci x k x k`, k = 3 or 1, zero point 0), their scales
    /// (`co` values or one for all) and the int32 `bias` (scale = input scale x weight scale;
    /// `co` values, or none). `input_scale` is the input's scale (f32 per u8 step). None when
    /// the lengths do not fit those shapes or a scale is not finite and positive.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        weights: &[i8],
        weight_scales: &[f32],
        bias: Option<&[i32]>,
        input_scale: f32,
        input: InputQuant,
        co: usize,
        ci: usize,
        k: usize,
    ) -> Option<Self> {
        let taps = k * k;
        let positive = |s: f32| s.is_finite() && s > 0.0;
        if co == 0
            || ci == 0
            || !(k == 1 || k == 3)
            || weights.len() != co * ci * taps
            || !(weight_scales.len() == 1 || weight_scales.len() == co)
            || bias.is_some_and(|b| b.len() != co)
            || !positive(input_scale)
            || !positive(input.inv_scale)
            || !weight_scales.iter().all(|&s| positive(s))
        {
            return None;
        }
        let groups = ci.div_ceil(GROUP);
        let blocks = co.div_ceil(OCB);
        let mut packed = vec![0i32; blocks * groups * taps * OCB];
        let mut multiplier = vec![0f32; blocks * OCB];
        let mut offset = vec![[0f32; 4]; blocks * OCB];
        for o in 0..co {
            let (block, lane) = (o / OCB, o % OCB);
            // Sums of all weights, of the left column's and of the right column's (3x3).
            let (mut sum, mut left, mut right) = (0i64, 0i64, 0i64);
            for i in 0..ci {
                for tap in 0..taps {
                    let w = weights[(o * ci + i) * taps + tap];
                    sum += w as i64;
                    if k == 3 && tap % 3 == 0 {
                        left += w as i64;
                    }
                    if k == 3 && tap % 3 == 2 {
                        right += w as i64;
                    }
                    let word =
                        &mut packed[((block * groups + i / GROUP) * taps + tap) * OCB + lane];
                    let shift = 8 * (i % GROUP);
                    *word |= ((w as u8 as u32) << shift) as i32;
                }
            }
            let scale = weight_scales[if weight_scales.len() == 1 { 0 } else { o }];
            let m = input_scale as f64 * scale as f64;
            multiplier[o] = m as f32;
            // The padding rows and channels hold the zero point, so an interior pixel's sum
            // includes zero * sum(w); it is taken out here, with the bias added. At the first
            // (last) column the left (right) taps read zeros instead, so their share is not in
            // the sum and stays out of the correction.
            let (b, zero) = (bias.map_or(0, |b| b[o]) as i64, input.zero as i64);
            let at = |missing: i64| ((b - zero * (sum - missing)) as f64 * m) as f32;
            offset[o] = [at(0), at(left), at(right), at(left + right)];
        }
        Some(QuantConv { ci, co, k, input, packed, multiplier, offset, winograd: None })
    }

    /// Adds the exact Winograd form of this conv ([`super::quant_winograd`]) where it can run
    /// and pays: a 3x3 conv from 64 input channels on a CPU with AVX-512 BW + VNNI, unless
    /// `DIFFSHIELD_WINOGRAD=0`, on planes of `plane` (`h x w`, where known) of at least 4
    /// tiles of 4x4 (on smaller ones it would need 12 images a thread to run at all). Its
    /// weights are 8x the direct kernel's (41 MB for the int8 denoiser_m against 5.7 MB), so
    /// they are built only then. `weights` are the ones [`QuantConv::new`] took.
    pub fn with_winograd_for(mut self, plane: Option<(usize, usize)>, weights: &[i8]) -> Self {
        use super::quant_winograd::{Weights, MIN_CI};
        let pays = plane.is_none_or(|(h, w)| {
            h.is_multiple_of(4) && w.is_multiple_of(4) && (h / 4) * (w / 4) >= 4
        });
        if self.k == 3
            && self.ci >= MIN_CI
            && pays
            && Weights::supported()
            && super::switches::enabled(super::direct_conv::WINOGRAD_ENV, true)
        {
            self.winograd = self.winograd_weights(weights);
        }
        self
    }

    /// The Winograd form of this conv's `weights` (the ones [`QuantConv::new`] took), with its
    /// input zero point and dequantization; None where that kernel does not take the conv.
    fn winograd_weights(&self, weights: &[i8]) -> Option<super::quant_winograd::Weights> {
        let shape = (self.co, self.ci);
        let zero = self.input.zero;
        super::quant_winograd::Weights::new(weights, shape, zero, &self.multiplier, &self.offset)
    }

    /// Convolves `x` (`n x ci x h x w` f32, contiguous NCHW) into `y` (`n x co x h x w` f32).
    /// Errors when the slice lengths disagree with the shapes or the CPU lacks AVX-512 VNNI.
    pub fn run(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        y: &mut [f32],
    ) -> Result<(), String> {
        self.run_adding(x, n, h, w, None, y)
    }

    /// [`QuantConv::run`], then `addend` added to each output value (see [`Addend`]).
    pub fn run_adding(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        addend: Option<Addend<'_>>,
        y: &mut [f32],
    ) -> Result<(), String> {
        let wanted = match addend {
            None => None,
            Some(Addend::PerChannel(a)) => Some((a.len(), n * self.co)),
            Some(Addend::Full(a)) => Some((a.len(), n * self.co * h * w)),
        };
        if let Some((got, want)) = wanted.filter(|(got, want)| got != want) {
            return Err(format!("int8 conv: an addend of {got} values where {want} belong"));
        }
        if x.len() != n * self.ci * h * w || y.len() != n * self.co * h * w {
            return Err(format!(
                "int8 conv: input of {} / output of {} values for n={n} ci={} co={} {h}x{w}",
                x.len(),
                y.len(),
                self.ci,
                self.co
            ));
        }
        if !Self::supported() {
            return Err("int8 conv: this CPU has no AVX-512 VNNI".into());
        }
        if n * h * w == 0 {
            // No images or an empty plane: `y` is empty too (checked above).
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(winograd) = self.winograd.as_ref().filter(|_| {
            super::quant_winograd::Weights::takes(n, (h, w), super::par::threads())
                && super::quant_winograd::Weights::supported()
        }) {
            // SAFETY: the CPU and the plane were checked just above, the lengths before.
            unsafe {
                winograd.run(x, n, (h, w), (self.input.inv_scale, self.input.zero), addend, y)
            };
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        SCRATCH.with(|scratch| {
            // SAFETY: AVX-512F and VNNI were detected above; `images` sizes its buffers, and
            // the addend's length was checked against the output's.
            unsafe { self.images(x, n, (h, w), addend, y, &mut scratch.borrow_mut()) };
        });
        Ok(())
    }
}

impl super::conv_kernel::ConvKernel for QuantConv {
    const NAME: &'static str = "QuantConv";

    fn shape(&self) -> super::conv_kernel::ConvShape {
        super::conv_kernel::ConvShape { ci: self.ci, co: self.co, k: self.k, stride: 1 }
    }

    /// The int8 bias is packed; a run-time bias is refused.
    fn run(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), String> {
        match bias {
            Some(_) => {
                Err("int8 conv: the bias is packed, a run-time bias is not supported".into())
            }
            None => QuantConv::run(self, x, n, h, w, y),
        }
    }

    fn run_with_addend(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        addend: Addend<'_>,
        y: &mut [f32],
    ) -> Result<(), String> {
        self.run_adding(x, n, h, w, Some(addend), y)
    }
}

thread_local! {
    /// Each thread's buffers, kept between calls.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

#[derive(Default)]
struct Scratch {
    /// The quantized input: per image, `ci / 4` planes (see [`Rows`]) of words of four
    /// channels, plus slack for the last vectors' reads.
    padded: Vec<i32>,
    /// Per pixel vector of the output: the lanes whose left / right taps are inside the row.
    masks: Vec<[u16; 2]>,
}

/// Where things are in one channel group's plane of the row layout.
#[derive(Debug, Clone, Copy)]
struct Rows {
    h: usize,
    w: usize,
    /// Kernel radius: 1 for 3x3 (a row of the zero point above and below, and one word before
    /// the top row, which the up-left tap of the first pixel reads), 0 for 1x1.
    pad: usize,
}

impl Rows {
    /// Words of one plane.
    fn plane(self) -> usize {
        self.pad + (self.h + 2 * self.pad) * self.w + self.pad
    }

    /// Where the first image pixel is.
    fn interior(self) -> usize {
        self.pad + self.pad * self.w
    }
}

#[cfg(target_arch = "x86_64")]
impl QuantConv {
    /// `n` images: (image, channel group) items quantized into the padded buffer, then (image,
    /// output-channel block) items convolved, both split over the pool of [`super::par`].
    /// Safety: the CPU must support AVX-512F and VNNI; `x` is `n x ci x h x w`, `y`
    /// `n x co x h x w`, and `addend` holds as many values as its kind needs (`n x co`, or as
    /// many as `y`).
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn images(
        &self,
        x: &[f32],
        n: usize,
        (h, w): (usize, usize),
        addend: Option<Addend<'_>>,
        y: &mut [f32],
        s: &mut Scratch,
    ) {
        let rows = Rows { h, w, pad: self.k / 2 };
        let (plane, hw) = (rows.plane(), h * w);
        let groups = self.ci.div_ceil(GROUP);
        let vectors = hw.div_ceil(LANES);
        // The last vector's taps read up to LANES - 1 + 2 * pad words past the last plane.
        let len = groups * plane + 2 * LANES;
        if s.padded.len() < n * len {
            s.padded.resize(n * len, 0);
        }
        // Quantizing reads the whole input, so on one thread it held the others back ahead of
        // every conv; split by channel group, each item writes every word of its part of the
        // buffer (the padding, and after the last group the slack, with the zero point).
        let padded = SyncPtr(s.padded.as_mut_ptr());
        super::par::for_each(n * groups, |item| {
            let (b, g) = (item / groups, item % groups);
            let image = &x[b * self.ci * hw..(b + 1) * self.ci * hw];
            // The last group's item also owns the slack after its plane.
            let words = if g + 1 == groups { len - g * plane } else { plane };
            // SAFETY: item (b, g) writes only words b * len + g * plane .. + `words` of the
            // buffer sized above; the caller checked the CPU.
            unsafe {
                let dst =
                    std::slice::from_raw_parts_mut(padded.ptr().add(b * len + g * plane), words);
                self.quantize_group(image, g, rows, dst);
            }
        });
        s.masks.clear();
        s.masks.extend((0..vectors).map(|v| edge_masks(v * LANES, w)));
        let blocks = self.co.div_ceil(OCB);
        let taps = self.k * self.k;
        let tap_offsets: [usize; 9] =
            [0, 1, 2, w, w + 1, w + 2, 2 * w, 2 * w + 1, 2 * w + 2].map(|o| o * (self.k / 2));
        let (padded, out) = (SyncPtr::of(s.padded.as_ptr()), SyncPtr(y.as_mut_ptr()));
        let masks = &s.masks;
        super::par::for_each(n * blocks, |item| {
            let (b, block) = (item / blocks, item % blocks);
            let tile = QuantTile {
                x: padded.ptr().add(b * len).cast_const(),
                plane,
                groups,
                w: self.packed.as_ptr().add(block * groups * taps * OCB),
                multiplier: &self.multiplier[block * OCB..block * OCB + OCB],
                offset: &self.offset[block * OCB..block * OCB + OCB],
                channels: (self.co - block * OCB).min(OCB),
                out: out.ptr().add((b * self.co + block * OCB) * hw),
                hw,
                // The same channels of image b in the addend.
                addend: match addend {
                    None => TileAddend::None,
                    Some(Addend::PerChannel(a)) => {
                        TileAddend::PerChannel(a.as_ptr().add(b * self.co + block * OCB))
                    }
                    Some(Addend::Full(a)) => {
                        TileAddend::Full(a.as_ptr().add((b * self.co + block * OCB) * hw))
                    }
                },
            };
            // SAFETY: AVX-512F and VNNI were detected by the caller; the item reads image b's
            // quantized input and writes only its own block's channels of image b in `y`.
            unsafe {
                let mut v = 0;
                while v + PV <= vectors {
                    tile.run::<PV>(&tap_offsets[..taps], v, masks);
                    v += PV;
                }
                match vectors - v {
                    2 => tile.run::<2>(&tap_offsets[..taps], v, masks),
                    1 => tile.run::<1>(&tap_offsets[..taps], v, masks),
                    _ => {}
                }
            }
        });
    }

    /// Channels `4g .. 4g + 4` of one image (`ci x h x w`), quantized as the model's
    /// `QuantizeLinear` does, into `dst`: one plane of [`Rows`] (channels past `ci` and the
    /// padding at the zero point), then any slack, also at the zero point.
    /// Safety: the CPU must support AVX-512F; `dst` holds at least one plane.
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_group(&self, image: &[f32], g: usize, rows: Rows, dst: &mut [i32]) {
        use std::arch::x86_64::*;
        let hw = rows.h * rows.w;
        let zero = self.input.zero as i32;
        // Four zero-point bytes; `zero * 0x0101_0101` overflows i32 from a zero point of 128.
        let zero_word = i32::from_ne_bytes([self.input.zero; GROUP]);
        let (head, rest) = dst.split_at_mut(rows.interior());
        let (body, tail) = rest.split_at_mut(hw);
        head.fill(zero_word);
        tail.fill(zero_word);
        let quant = Quantizer::new(self.input.inv_scale, self.input.zero);
        let zp = _mm512_set1_epi32(zero);
        // The rows are back to back in both layouts, so the image is one run of `hw` values.
        let mut i = 0;
        while i < hw {
            let lanes = (hw - i).min(LANES);
            let mask: __mmask16 = if lanes == LANES { !0 } else { (1u16 << lanes) - 1 };
            let mut word = _mm512_set1_epi32(0);
            for j in 0..GROUP {
                let ch = g * GROUP + j;
                let q = if ch < self.ci {
                    quant.lanes(_mm512_maskz_loadu_ps(mask, image.as_ptr().add(ch * hw + i)))
                } else {
                    zp
                };
                let shifted = match j {
                    0 => q,
                    1 => _mm512_slli_epi32::<8>(q),
                    2 => _mm512_slli_epi32::<16>(q),
                    _ => _mm512_slli_epi32::<24>(q),
                };
                word = if j == 0 { shifted } else { _mm512_or_si512(word, shifted) };
            }
            _mm512_mask_storeu_epi32(body.as_mut_ptr().add(i), mask, word);
            i += LANES;
        }
    }
}

/// The model's `QuantizeLinear` of 16 f32 lanes into u8 values in i32 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Quantizer {
    inv: std::arch::x86_64::__m512,
    zero: std::arch::x86_64::__m512i,
    below: std::arch::x86_64::__m512,
    above: std::arch::x86_64::__m512,
}

#[cfg(target_arch = "x86_64")]
impl Quantizer {
    /// For `q = clamp(round(x * inv_scale) + zero, 0, 255)`.
    /// Safety: the CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn new(inv_scale: f32, zero: u8) -> Self {
        use std::arch::x86_64::*;
        let z = zero as f32;
        Quantizer {
            inv: _mm512_set1_ps(inv_scale),
            zero: _mm512_set1_epi32(zero as i32),
            below: _mm512_set1_ps(-z),
            above: _mm512_set1_ps(255.0 - z),
        }
    }

    /// Scaled values are clamped in f32 to -zero..=255 - zero, the range that lands on
    /// 0..=255 once the zero point is added: integers, so rounding inside the range is
    /// untouched and a value outside it rounds to the bound the integer clamp would have
    /// given, while the conversion never sees anything past i32 (a huge activation or an
    /// infinity would become i32::MIN). A NaN becomes 0.0, the zero point, as in tract's
    /// QuantizeLinear. (One clamp in f32 instead of one there and one on the integers:
    /// two instructions fewer per channel vector.)
    /// Safety: the CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lanes(self, v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        // Round to nearest even (the MXCSR default), like QuantizeLinear.
        let scaled = _mm512_mul_ps(v, self.inv);
        let number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(scaled, scaled);
        let scaled = _mm512_min_ps(_mm512_maskz_max_ps(number, scaled, self.below), self.above);
        _mm512_add_epi32(_mm512_cvtps_epi32(scaled), self.zero)
    }
}

/// For the output pixel vector starting at flat index `first` of rows `w` wide: the lanes whose
/// left neighbour is in the same row (not column 0), and those whose right neighbour is (not
/// column `w - 1`).
fn edge_masks(first: usize, w: usize) -> [u16; 2] {
    let (mut left, mut right) = (0u16, 0u16);
    for lane in 0..LANES {
        let column = (first + lane) % w;
        left |= u16::from(column != 0) << lane;
        right |= u16::from(column + 1 != w) << lane;
    }
    [left, right]
}

/// One output-channel block's view of the buffers.
#[cfg(target_arch = "x86_64")]
struct QuantTile<'a> {
    /// The image's quantized planes.
    x: *const i32,
    plane: usize,
    groups: usize,
    /// The block's packed weights.
    w: *const i32,
    /// The block's `OCB` multipliers and offsets (padded past `co`).
    multiplier: &'a [f32],
    offset: &'a [[f32; 4]],
    /// Output channels of the block that exist (the last block may have fewer than `OCB`).
    channels: usize,
    /// The block's first output channel of the image in `y`; channels are `hw` apart.
    out: *mut f32,
    hw: usize,
    addend: TileAddend,
}

/// The block's part of an [`Addend`]: the values for its first channel.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum TileAddend {
    None,
    /// One value per channel, consecutive.
    PerChannel(*const f32),
    /// Planes laid out as the output's.
    Full(*const f32),
}

#[cfg(target_arch = "x86_64")]
impl QuantTile<'_> {
    /// `N` pixel vectors from vector `v0` on, `OCB` output channels, all taps (9: a 3x3
    /// kernel, whose left and right taps are masked by `masks`; 1: a 1x1), dequantized into
    /// the output.
    /// Safety: the CPU must support AVX-512F and VNNI; `self` as [`QuantConv::images`] builds
    /// it, `taps` its 9 or 1 offsets, and vectors `v0 .. v0 + N` start inside the plane (`masks`
    /// has one entry per vector); no other thread writes the block's output channels.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn run<const N: usize>(&self, taps: &[usize], v0: usize, masks: &[[u16; 2]]) {
        use std::arch::x86_64::*;
        let first = v0 * LANES;
        let mut acc = [[_mm512_setzero_si512(); N]; OCB];
        let (mut left, mut right) = ([0u16; N], [0u16; N]);
        for p in 0..N {
            [left[p], right[p]] = masks[v0 + p];
        }
        let t_len = taps.len();
        for g in 0..self.groups {
            let xg = self.x.add(g * self.plane + first);
            let wg = self.w.add(g * t_len * OCB);
            for (t, &tap) in taps.iter().enumerate() {
                let mut xv = [_mm512_setzero_si512(); N];
                for (p, xv) in xv.iter_mut().enumerate() {
                    let at = xg.add(tap + p * LANES);
                    // Column 0 of the kernel looks left, column 2 right (3x3 only).
                    *xv = match (t_len, t % 3) {
                        (9, 0) => _mm512_maskz_loadu_epi32(left[p], at),
                        (9, 2) => _mm512_maskz_loadu_epi32(right[p], at),
                        _ => _mm512_loadu_si512(at.cast()),
                    };
                }
                for (j, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_epi32(*wg.add(t * OCB + j));
                    for p in 0..N {
                        row[p] = _mm512_dpbusd_epi32(row[p], xv[p], wv);
                    }
                }
            }
        }
        // `acc` is handed over by value: a reference to it made LLVM zero its stack copy with
        // a `memset` call per tile (1536 bytes at N = 3; 2-3 % of an int8 call in `perf`),
        // where a value lets the zeroes live in registers until the store.
        self.store::<N>(acc, first, &left, &right);
    }

    /// The tile's sums dequantized (and any addend added) into the output. Kept out of line:
    /// inlined, its branches made LLVM spill accumulators in the `vpdpbusd` loop (2x slower).
    /// Safety: the CPU must support AVX-512F; `first + (N - 1) * LANES < self.hw`; `self.out`
    /// and a `Full` addend hold `self.channels` planes of `hw` values (a `PerChannel` one
    /// `self.channels` values), and no other thread writes these output vectors.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const N: usize>(
        &self,
        acc: [[std::arch::x86_64::__m512i; N]; OCB],
        first: usize,
        left: &[u16; N],
        right: &[u16; N],
    ) {
        use std::arch::x86_64::*;
        for (j, row) in acc.iter().enumerate().take(self.channels) {
            let m = _mm512_set1_ps(self.multiplier[j]);
            let [inner, first_col, last_col, both] = self.offset[j].map(|o| _mm512_set1_ps(o));
            for (p, &a) in row.iter().enumerate() {
                // Lanes at the first / last column of a row get the offsets that leave their
                // masked taps' zero-point share out.
                let at_first = !left[p];
                let at_last = !right[p];
                let mut offset = _mm512_mask_mov_ps(inner, at_first, first_col);
                offset = _mm512_mask_mov_ps(offset, at_last, last_col);
                offset = _mm512_mask_mov_ps(offset, at_first & at_last, both);
                let mut v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), m), offset);
                let start = first + p * LANES;
                let lanes = self.hw.saturating_sub(start).min(LANES);
                let mask: __mmask16 = if lanes == LANES { !0 } else { (1u16 << lanes) - 1 };
                v = match self.addend {
                    TileAddend::None => v,
                    TileAddend::PerChannel(a) => _mm512_add_ps(v, _mm512_set1_ps(*a.add(j))),
                    TileAddend::Full(a) => {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.add(j * self.hw + start)))
                    }
                };
                _mm512_mask_storeu_ps(self.out.add(j * self.hw + start), mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values::{reference_conv, values};

    /// The quantized model's arithmetic in f64: quantize x (relative to the zero point, so
    /// zero padding in the real domain is padding with the zero point), an exact integer conv
    /// with the int32 bias, dequantize per output channel.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        (ci, h, w): (usize, usize, usize),
        wt: &[i8],
        scales: &[f32],
        bias: &[i32],
        input_scale: f32,
        quant: InputQuant,
        (co, k): (usize, usize),
    ) -> Vec<f64> {
        let q = |v: f32| {
            // `as` saturates an infinity at i64::MAX (a NaN is 0), so the zero point is added
            // saturating too.
            let r =
                ((v * quant.inv_scale).round_ties_even() as i64).saturating_add(quant.zero as i64);
            (r.clamp(0, 255) - quant.zero as i64) as f64
        };
        let xq: Vec<f64> = x.iter().map(|&v| q(v)).collect();
        let wt: Vec<f64> = wt.iter().map(|&v| v as f64).collect();
        let bias: Vec<f64> = bias.iter().map(|&v| v as f64).collect();
        let sums = reference_conv(&xq, (ci, h, w), &wt, &bias, (co, k));
        let plane = h * w;
        sums.iter()
            .enumerate()
            .map(|(j, &s)| {
                let scale = scales[if scales.len() == 1 { 0 } else { j / plane }] as f64;
                s * input_scale as f64 * scale
            })
            .collect()
    }

    #[test]
    fn matches_the_integer_reference() {
        if !QuantConv::supported() {
            crate::test_skip::note(
                "the int8 kernel: this CPU has no AVX-512 VNNI, it is never used here",
            );
            return;
        }
        // (n, co, ci, h, w): whole and partial channel groups (ci = 5, 7) and blocks (co = 3,
        // 13), rows of 32, 20, 16, 8, 5, 4 and 1 pixels (vectors spanning rows, partial last
        // vectors, a pixel both first and last of its row), batches of 2.
        let shapes = [
            (1, 8, 4, 7, 1),
            (2, 5, 8, 1, 9),
            (1, 16, 32, 32, 32),
            (2, 13, 7, 16, 16),
            (1, 24, 16, 8, 8),
            (2, 3, 5, 5, 5),
            (1, 9, 4, 6, 20),
            (1, 8, 64, 4, 4),
        ];
        for k in [3, 1] {
            for &(n, co, ci, h, w) in &shapes {
                // Inputs beyond the quantization range saturate, as in the model.
                let x: Vec<f32> = values(n * ci * h * w, 1).iter().map(|v| v * 1.2).collect();
                let wt: Vec<i8> =
                    values(co * ci * k * k, 2).iter().map(|v| (v * 127.0) as i8).collect();
                let scales: Vec<f32> = (0..co).map(|o| 0.001 + o as f32 * 1e-4).collect();
                let bias: Vec<i32> = values(co, 3).iter().map(|v| (v * 5000.0) as i32).collect();
                let quant = InputQuant { inv_scale: 127.0, zero: 110 };
                let input_scale = 1.0 / 127.0;
                let conv = QuantConv::new(&wt, &scales, Some(&bias), input_scale, quant, co, ci, k)
                    .expect("shapes fit");
                let [y, y2, y3] = crate::backend::par::on_thread_counts(|| {
                    let mut y = vec![f32::NAN; n * co * h * w];
                    conv.run(&x, n, h, w, &mut y).expect("runs");
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                });
                let case = format!("k{k} ({n},{co},{ci},{h},{w})");
                assert!(y == y2 && y == y3, "{case}: thread counts change the bits");
                let y: Vec<f32> = y.into_iter().map(f32::from_bits).collect();
                for b in 0..n {
                    let image = &x[b * ci * h * w..(b + 1) * ci * h * w];
                    let want = reference(
                        image,
                        (ci, h, w),
                        &wt,
                        &scales,
                        &bias,
                        input_scale,
                        quant,
                        (co, k),
                    );
                    let got = &y[b * co * h * w..(b + 1) * co * h * w];
                    for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                        let case = format!("k{k} n{b} i{i} ({co},{ci},{h},{w})");
                        assert!(
                            (g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                            "{case}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn adds_an_addend_as_a_separate_add_would_bit_for_bit() {
        if !QuantConv::supported() {
            crate::test_skip::note("the int8 kernel's addend: this CPU has no AVX-512 VNNI");
            return;
        }
        // Whole and partial blocks (co = 13), a partial last vector (5 x 5), batches of 2.
        for (n, co, ci, h, w, k) in
            [(2, 13, 8, 5, 5, 3), (2, 16, 4, 8, 8, 1), (1, 8, 12, 16, 16, 3)]
        {
            let x: Vec<f32> = values(n * ci * h * w, 1);
            let wt: Vec<i8> =
                values(co * ci * k * k, 2).iter().map(|v| (v * 127.0) as i8).collect();
            let bias: Vec<i32> = values(co, 3).iter().map(|v| (v * 500.0) as i32).collect();
            let quant = InputQuant { inv_scale: 100.0, zero: 128 };
            let conv = QuantConv::new(&wt, &[0.002], Some(&bias), 0.01, quant, co, ci, k)
                .expect("shapes fit");
            let mut plain = vec![0f32; n * co * h * w];
            conv.run(&x, n, h, w, &mut plain).expect("runs");
            let per_channel = values(n * co, 4);
            let full = values(n * co * h * w, 5);
            let plane = h * w;
            let spread: Vec<f32> = (0..plain.len()).map(|i| per_channel[i / plane]).collect();
            for (name, addend, added) in [
                ("per channel", Addend::PerChannel(&per_channel), &spread),
                ("full", Addend::Full(&full), &full),
            ] {
                let [y, y2, y3] = crate::backend::par::on_thread_counts(|| {
                    let mut y = vec![f32::NAN; n * co * h * w];
                    conv.run_adding(&x, n, h, w, Some(addend), &mut y).expect("runs");
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                });
                let case = format!("{name} ({n},{co},{ci},{h},{w}) k{k}");
                assert!(y == y2 && y == y3, "{case}: thread counts change the bits");
                for (i, &got) in y.iter().enumerate() {
                    let want = plain[i] + added[i];
                    assert_eq!(got, want.to_bits(), "{case} value {i}");
                }
            }
            let mut y = vec![0f32; n * co * h * w];
            let short = Addend::Full(&full[1..]);
            assert!(conv.run_adding(&x, n, h, w, Some(short), &mut y).is_err());
        }
    }

    /// `direct` (a 3x3 conv with weights `wt`) on the Winograd kernel, whatever its channels
    /// (the kernel takes multiples of 32; [`QuantConv::with_winograd_for`] picks it from 64 on).
    fn with_winograd(direct: &QuantConv, wt: &[i8]) -> QuantConv {
        let winograd = direct.winograd_weights(wt);
        assert!(winograd.is_some(), "({},{}) is a Winograd shape", direct.co, direct.ci);
        QuantConv { winograd, ..direct.clone() }
    }

    /// `conv`'s Winograd kernel itself, whatever the tile count (`run_adding` picks the direct
    /// kernel for few tiles per thread).
    fn run_winograd(
        conv: &QuantConv,
        x: &[f32],
        n: usize,
        (h, w): (usize, usize),
        addend: Option<Addend<'_>>,
        y: &mut [f32],
    ) {
        let winograd = conv.winograd.as_ref().expect("a Winograd conv");
        let wanted = match addend {
            None => 0,
            Some(Addend::PerChannel(a)) => a.len() - n * conv.co,
            Some(Addend::Full(a)) => a.len() - y.len(),
        };
        assert!(crate::backend::quant_winograd::Weights::supported());
        assert!(h % 4 == 0 && w % 4 == 0 && wanted == 0);
        assert!(x.len() == n * conv.ci * h * w && y.len() == n * conv.co * h * w);
        let quant = (conv.input.inv_scale, conv.input.zero);
        // SAFETY: the CPU, the plane and the lengths were checked just above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            winograd.run(x, n, (h, w), quant, addend, y)
        };
        // Not reached: `supported` is false off x86-64 and the callers skip.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (winograd, quant, addend, y);
    }

    #[test]
    fn builds_winograd_weights_only_where_they_can_pay() {
        let quant = InputQuant { inv_scale: 10.0, zero: 3 };
        let conv = |ci: usize, k: usize, plane: Option<(usize, usize)>| {
            let wt = vec![1i8; 32 * ci * k * k];
            let conv = QuantConv::new(&wt, &[1.0], None, 0.1, quant, 32, ci, k).expect("fits");
            conv.with_winograd_for(plane, &wt).winograd.is_some()
        };
        let here = crate::backend::quant_winograd::Weights::supported()
            && crate::backend::switches::enabled(super::super::direct_conv::WINOGRAD_ENV, true);
        assert_eq!(conv(128, 3, Some((8, 8))), here, "8x8: 4 tiles an image");
        assert_eq!(conv(128, 3, None), here, "a plane not known");
        assert!(!conv(128, 3, Some((4, 4))), "one tile an image: never 12 a thread");
        assert!(!conv(128, 3, Some((10, 8))), "not whole tiles");
        assert_eq!(conv(64, 3, Some((32, 32))), here, "64 input channels");
        assert!(!conv(32, 3, Some((32, 32))), "32 input channels: the direct kernel");
        assert!(!conv(128, 1, Some((32, 32))), "1x1");
    }

    #[test]
    fn runs_winograd_only_with_enough_tiles_for_each_thread() {
        use crate::backend::quant_winograd::Weights;
        // 12 tiles a thread: batch 8 of 8x8 planes (32 tiles) on two threads, not batch 1.
        assert!(Weights::takes(8, (8, 8), 2));
        assert!(!Weights::takes(1, (8, 8), 2));
        assert!(Weights::takes(1, (32, 32), 2) && !Weights::takes(1, (16, 16), 2));
        assert!(Weights::takes(1, (16, 16), 1));
        assert!(!Weights::takes(8, (30, 32), 1) && !Weights::takes(8, (32, 6), 1));
    }

    #[test]
    fn winograd_gives_the_direct_kernels_bits() {
        if !crate::backend::quant_winograd::Weights::supported() {
            crate::test_skip::note("the int8 Winograd conv: this CPU has no AVX-512 BW + VNNI");
            return;
        }
        // (n, co, ci, h, w, zero point): one tile, one-tile-wide rows (first and last column
        // in one tile), rectangles, several blocks of both channel kinds, batches that split
        // into uneven items; zero points at both ends.
        let shapes = [
            (1, 32, 32, 4, 4, 0),
            (2, 32, 32, 8, 4, 255),
            (2, 64, 64, 8, 12, 110),
            (3, 32, 96, 16, 8, 128),
            (1, 64, 32, 32, 32, 7),
        ];
        for (n, co, ci, h, w, zero) in shapes {
            let mut x: Vec<f32> = values(n * ci * h * w, 1).iter().map(|v| v * 1.5).collect();
            let extremes = [f32::INFINITY, 1e30, -3e9, f32::NEG_INFINITY, f32::NAN, 0.0];
            let len = x.len();
            for (i, &v) in extremes.iter().enumerate() {
                x[i * 37 % len] = v;
            }
            let wt: Vec<i8> = values(co * ci * 9, 2).iter().map(|v| (v * 127.0) as i8).collect();
            let bias: Vec<i32> = values(co, 3).iter().map(|v| (v * 5000.0) as i32).collect();
            let scales: Vec<f32> = (0..co).map(|o| 0.001 + o as f32 * 1e-4).collect();
            let quant = InputQuant { inv_scale: 100.0, zero };
            let direct = QuantConv::new(&wt, &scales, Some(&bias), 0.01, quant, co, ci, 3)
                .expect("shapes fit");
            let conv = with_winograd(&direct, &wt);
            let per_channel = values(n * co, 4);
            let full = values(n * co * h * w, 5);
            let addends = [None, Some(Addend::PerChannel(&per_channel)), Some(Addend::Full(&full))];
            for addend in addends {
                let want = {
                    let mut y = vec![f32::NAN; n * co * h * w];
                    direct.run_adding(&x, n, h, w, addend, &mut y).expect("runs");
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let run = |conv: &QuantConv| {
                    let mut y = vec![f32::NAN; n * co * h * w];
                    run_winograd(conv, &x, n, (h, w), addend, &mut y);
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let kind = match addend {
                    None => "no addend",
                    Some(Addend::PerChannel(_)) => "per channel",
                    Some(Addend::Full(_)) => "full",
                };
                let case = format!("({n},{co},{ci},{h},{w}) zero {zero} {kind}");
                for (threads, got) in
                    crate::backend::par::on_thread_counts(|| run(&conv)).into_iter().enumerate()
                {
                    let wrong = got.iter().zip(&want).position(|(g, w)| g != w);
                    assert!(wrong.is_none(), "{case}, pool {threads}: value {wrong:?} differs");
                }
            }
        }
    }

    #[test]
    fn winograd_is_exact_at_the_largest_sums_it_takes() {
        if !crate::backend::quant_winograd::Weights::supported() {
            crate::test_skip::note("the int8 Winograd conv: this CPU has no AVX-512 BW + VNNI");
            return;
        }
        // 96 input channels of +-127 weights: |sum| up to 255 x 9 x 96 x 127 = 0.83 x 2^25,
        // reached inside the plane where every input is 255 (the first 16 output channels'
        // weights all +127, the others' all -127).
        let (n, co, ci, h, w) = (1, 32, 96, 8, 8);
        let wt: Vec<i8> =
            (0..co * ci * 9).map(|i| if i < 16 * ci * 9 { 127 } else { -127 }).collect();
        let quant = InputQuant { inv_scale: 1.0, zero: 0 };
        let direct = QuantConv::new(&wt, &[1.0], None, 1.0, quant, co, ci, 3).expect("fits");
        let conv = with_winograd(&direct, &wt);
        for pattern in 0..2 {
            let x: Vec<f32> = (0..n * ci * h * w)
                .map(|i| if pattern == 0 || i % 13 < 11 { 255.0 } else { 0.0 })
                .collect();
            let (mut a, mut b) = (vec![0f32; n * co * h * w], vec![0f32; n * co * h * w]);
            run_winograd(&conv, &x, n, (h, w), None, &mut a);
            direct.run(&x, n, h, w, &mut b).expect("runs");
            let big = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(pattern > 0 || big > 2.7e7, "the sums reach only {big}");
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "pattern {pattern}");
        }
    }

    #[test]
    fn saturates_huge_and_infinite_inputs_and_takes_a_high_zero_point() {
        if !QuantConv::supported() {
            crate::test_skip::note("the int8 kernel's saturation: this CPU has no AVX-512 VNNI");
            return;
        }
        // Past i32 the conversion alone gives i32::MIN, which would quantize +inf to 0 (and a
        // NaN to 0 rather than the zero point); a zero point of 128 or more overflowed the
        // padding word's i32 arithmetic (debug builds).
        let (n, co, ci, h, w) = (1, 8, 5, 4, 4);
        let mut x: Vec<f32> = values(n * ci * h * w, 1);
        let extremes =
            [f32::INFINITY, 1e30, 3e9, -3e9, -1e30, f32::NEG_INFINITY, f32::MAX, f32::NAN];
        for (i, &v) in extremes.iter().enumerate() {
            x[i * 11] = v;
        }
        for (k, zero) in [(1, 200), (3, 128), (3, 255)] {
            let wt: Vec<i8> =
                values(co * ci * k * k, 2).iter().map(|v| (v * 127.0) as i8).collect();
            let quant = InputQuant { inv_scale: 100.0, zero };
            let conv = QuantConv::new(&wt, &[0.002], None, 0.01, quant, co, ci, k).expect("fits");
            let mut y = vec![f32::NAN; n * co * h * w];
            conv.run(&x, n, h, w, &mut y).expect("runs");
            let want = reference(&x, (ci, h, w), &wt, &[0.002], &[0; 8], 0.01, quant, (co, k));
            for (i, (&g, &r)) in y.iter().zip(&want).enumerate() {
                let case = format!("k{k} zero {zero} value {i}");
                assert!((g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "{case}: {g} vs {r}");
            }
        }
    }

    #[test]
    fn empty_batches_and_planes_are_no_work() {
        let quant = InputQuant { inv_scale: 10.0, zero: 3 };
        for k in [1, 3] {
            let conv = QuantConv::new(&vec![1; 2 * 3 * k * k], &[1.0], None, 0.1, quant, 2, 3, k)
                .expect("fits");
            for (n, h, w) in [(0, 4, 4), (1, 0, 4), (2, 4, 0)] {
                let x = vec![0.0; n * 3 * h * w];
                let result = conv.run(&x, n, h, w, &mut []);
                if QuantConv::supported() {
                    result.expect("no work is not an error");
                } else {
                    assert!(result.is_err(), "without VNNI even no work is refused");
                }
                assert!(conv.run(&x, n, h, w, &mut [0.0]).is_err(), "k{k} n={n} {h}x{w}");
            }
        }
    }

    #[test]
    fn refuses_bad_parameters() {
        let quant = InputQuant { inv_scale: 10.0, zero: 0 };
        assert!(QuantConv::new(&[0; 17], &[1.0], None, 0.1, quant, 2, 1, 3).is_none());
        assert!(QuantConv::new(&[0; 18], &[1.0; 3], None, 0.1, quant, 2, 1, 3).is_none());
        assert!(QuantConv::new(&[0; 18], &[1.0], Some(&[0]), 0.1, quant, 2, 1, 3).is_none());
        assert!(QuantConv::new(&[0; 18], &[0.0], None, 0.1, quant, 2, 1, 3).is_none());
        assert!(QuantConv::new(&[0; 18], &[1.0], None, f32::NAN, quant, 2, 1, 3).is_none());
        let conv =
            QuantConv::new(&[0; 18], &[1.0], Some(&[3, 4]), 0.5, quant, 2, 1, 3).expect("fits");
        let mut y = vec![0.0; 2 * 16];
        assert!(conv.run(&[0.0; 15], 1, 4, 4, &mut y).is_err());
        if QuantConv::supported() {
            conv.run(&[0.0; 16], 1, 4, 4, &mut y).expect("runs");
            assert!(y[..16].iter().all(|&v| v == 1.5) && y[16..].iter().all(|&v| v == 2.0));
        }
    }
}

/// A benchmark, not a check of speed: `cargo test --release --lib quant_conv::rates --
/// --ignored --nocapture` prints what the int8 conv sustains on each of denoiser_m's conv
/// shapes alone (one thread, batch 8), and over its 60 int8 convs run back to back on one and
/// on two threads, each reading the previous one's output (buffers that stay in L3, as a
/// model's do). `examples/dot_rates` gives the instruction's rate to compare with (64
/// multiply-adds per `vpdpbusd`). It fails only when the two thread counts disagree on the
/// bits.
#[cfg(all(test, target_arch = "x86_64"))]
mod rates {
    use super::*;

    /// (input channels, output channels, height = width, kernel size) of denoiser_m's int8
    /// convs in graph order (its two stride-2 convs stay float in the int8 file).
    const DENOISER_M: [(usize, usize, usize, usize); 60] = [
        (3, 64, 32, 3),
        (64, 64, 32, 3),
        (64, 64, 32, 3),
        (64, 64, 32, 3),
        (64, 64, 32, 3),
        (64, 128, 16, 3),
        (128, 128, 16, 3),
        (64, 128, 16, 1),
        (128, 384, 16, 1),
        (128, 128, 16, 1),
        (128, 128, 16, 3),
        (128, 128, 16, 3),
        (128, 384, 16, 1),
        (128, 128, 16, 1),
        (128, 128, 8, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 3),
        (128, 384, 8, 1),
        (128, 128, 8, 1),
        (128, 128, 8, 3),
        (128, 128, 8, 3),
        (256, 128, 8, 3),
        (128, 128, 8, 3),
        (256, 128, 8, 1),
        (256, 128, 8, 3),
        (128, 128, 8, 3),
        (256, 128, 8, 1),
        (256, 128, 8, 3),
        (128, 128, 8, 3),
        (256, 128, 8, 1),
        (128, 128, 16, 3),
        (256, 128, 16, 3),
        (128, 128, 16, 3),
        (256, 128, 16, 1),
        (128, 384, 16, 1),
        (128, 128, 16, 1),
        (256, 128, 16, 3),
        (128, 128, 16, 3),
        (256, 128, 16, 1),
        (128, 384, 16, 1),
        (128, 128, 16, 1),
        (192, 128, 16, 3),
        (128, 128, 16, 3),
        (192, 128, 16, 1),
        (128, 384, 16, 1),
        (128, 128, 16, 1),
        (128, 128, 32, 3),
        (192, 64, 32, 3),
        (64, 64, 32, 3),
        (192, 64, 32, 1),
        (128, 64, 32, 3),
        (64, 64, 32, 3),
        (128, 64, 32, 1),
        (128, 64, 32, 3),
        (64, 64, 32, 3),
        (128, 64, 32, 1),
        (64, 3, 32, 3),
    ];

    #[test]
    #[ignore = "a benchmark: run it with --ignored --nocapture"]
    fn denoiser_m_convs_back_to_back() {
        if !QuantConv::supported() {
            crate::test_skip::note("the int8 conv benchmark: this CPU has no AVX-512 VNNI");
            return;
        }
        let n = 8;
        let largest = DENOISER_M.iter().map(|&(ci, co, h, _)| n * ci.max(co) * h * h).max();
        let len = largest.unwrap_or(0);
        let convs: Vec<_> = DENOISER_M
            .iter()
            .map(|&(ci, co, h, k)| {
                // At most +-60, as trained weights are: the Winograd kernel takes every 3x3
                // conv then (sums within its exact range), as it takes all of the model's.
                let wt: Vec<i8> = crate::backend::test_values::values(co * ci * k * k, 2)
                    .iter()
                    .map(|v| (v * 60.0) as i8)
                    .collect();
                let quant = InputQuant { inv_scale: 100.0, zero: 128 };
                let conv = QuantConv::new(&wt, &[0.002], None, 0.01, quant, co, ci, k);
                let conv = conv.expect("shapes fit").with_winograd_for(Some((h, h)), &wt);
                (conv, ci, co, h, k)
            })
            .collect();
        let macs: usize =
            DENOISER_M.iter().map(|&(ci, co, h, k)| n * ci * co * h * h * k * k).sum();
        /// The fastest of ten runs of `run`, in seconds.
        fn best_of_ten(mut run: impl FnMut()) -> f64 {
            (0..10).fold(f64::MAX, |best, _| {
                let start = std::time::Instant::now();
                run();
                best.min(start.elapsed().as_secs_f64())
            })
        }
        let sequence = || {
            let (mut x, mut y) = (crate::backend::test_values::values(len, 1), vec![0f32; len]);
            let best = best_of_ten(|| {
                for (conv, ci, co, h, _) in &convs {
                    let (input, output) = (&x[..n * ci * h * h], &mut y[..n * co * h * h]);
                    conv.run(input, n, *h, *h, output).expect("runs");
                    std::mem::swap(&mut x, &mut y);
                }
            });
            (best, x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        let (one, bits1) = sequence();
        // As the runtime runs a model (`CpuThreads`): on one of the pool's threads, which
        // then shares each conv's items with the other.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let pool = std::sync::Arc::new(pool);
        let (two, bits2) =
            pool.install(|| crate::backend::par::scope(Some(pool.clone()), sequence));
        assert!(bits1 == bits2, "two threads changed the bits");
        // Each distinct shape alone on one thread, repeated on the same buffers.
        let mut seen = Vec::new();
        for &(ref conv, ci, co, h, k) in &convs {
            if seen.contains(&(ci, co, h, k)) {
                continue;
            }
            seen.push((ci, co, h, k));
            let x = crate::backend::test_values::values(n * ci * h * h, 3);
            let mut y = vec![0f32; n * co * h * h];
            let best = best_of_ten(|| conv.run(&x, n, h, h, &mut y).expect("runs"));
            let gmacs = (n * ci * co * h * h * k * k) as f64 / best / 1e9;
            println!("  {ci:>3} -> {co:>3} channels, {h}x{h}, {k}x{k}: {gmacs:.0} GMAC/s");
        }
        for (threads, s) in [(1, one), (2, two)] {
            println!(
                "{} int8 convs of denoiser_m, batch 8, {threads} thread(s): {:.2} ms, {:.0} GMAC/s",
                DENOISER_M.len(),
                s * 1e3,
                macs as f64 / s / 1e9
            );
        }
    }
}
