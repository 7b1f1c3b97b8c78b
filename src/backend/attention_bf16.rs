//! The attention of [`super::attention`] with bf16 products and f32 sums, for the int8 models
//! on x86-64 CPUs with AVX-512 BF16 (`vdpbf16ps`: 32 products per instruction where an f32 FMA
//! does 16).
//!
//! Why: once the int8 convs ran at `vpdpbusd`'s rate, the f32 attention blocks were about a
//! fifth of an int8 denoiser_s call, with the FMA units full. In the int8 models the attention
//! sits between two int8 convs: its queries, keys and values come from a conv whose input was
//! rounded to 256 levels, and its output is rounded to 256 levels again by the next conv's
//! input quantization. Rounding q, k, v and the softmax weights to bf16 (8 significant bits,
//! a relative error of at most 2^-9) and summing in f32 changes the denoiser's output by far
//! less than that quantization does (docs/int8.md has the measurements). The f32 models never
//! use this kernel.
//!
//! Same blocking as the f32 kernel: per (image, block of 48 queries), the transposed scores
//! `s[j][i]` of the block, the softmax lane-wise over rows, then the value product. bf16 pairs
//! are what `vdpbf16ps` multiplies: one 32-bit word holds two bf16 values, and each lane
//! accumulates `a.lo * b.lo + a.hi * b.hi`. So the queries and keys are packed once per image
//! as pairs of channels (`[c / 2][l]` words), the values as pairs of pixels (`[c][l / 2]`), and
//! each block's softmax weights as pairs of keys (`[l / 2][48]`). Rounding is to nearest even.

// The kernel is x86-64 only; elsewhere its types are type-checked but never run.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::attention::AttentionShape;
#[cfg(target_arch = "x86_64")]
use super::par::SyncPtr;

/// Query vectors per block (16 queries each).
const QV: usize = 3;
/// Lanes of one AVX-512 vector of f32.
const LANES: usize = 16;
/// Keys (score product) or channels (value product) per register tile: 8 x 3 accumulators.
const TR: usize = 8;

/// True when this CPU runs the kernel: x86-64 with AVX-512F and AVX-512 BF16, detected at run
/// time.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Attention of `n` images with bf16 products: `qkv(b)` are image `b`'s queries, keys and
/// values and `out` holds the `n` outputs, each `channels x pixels` f32, row-major. Images are
/// packed on the pool of [`super::par`], then (image, query block) items computed there.
/// Errors when a slice length disagrees with `shape`, the shape does not
/// [fit](AttentionShape::fits) or the CPU lacks AVX-512 BF16.
pub fn attend_images<'a>(
    shape: AttentionShape,
    scale: f32,
    n: usize,
    qkv: impl Fn(usize) -> [&'a [f32]; 3],
    out: &mut [f32],
) -> Result<(), String> {
    let images = super::attention::checked_images(shape, n, &qkv, out.len())?;
    if !supported() {
        return Err("attention: this CPU has no AVX-512 BF16".into());
    }
    // Elsewhere `supported` is false and the error above is returned.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (scale, images);
    #[cfg(target_arch = "x86_64")]
    PACKED.with(|packed| {
        let len = shape.channels * shape.pixels;
        let packed = &mut *packed.borrow_mut();
        // Per image: queries and keys as channel pairs, values as pixel pairs.
        let image = 3 * len / 2;
        packed.resize(n * image, 0);
        let words = SyncPtr(packed.as_mut_ptr());
        let (c, l) = (shape.channels, shape.pixels);
        super::par::for_each(n, |b| {
            let [q, k, v] = images[b];
            // SAFETY: AVX-512F and BF16 were detected above; item b writes only its own image's
            // `image` words of the buffer sized above, and c, l are multiples of 16 (`fits`).
            unsafe {
                let at = words.ptr().add(b * image);
                pack_channel_pairs(q, c, l, at);
                pack_channel_pairs(k, c, l, at.add(len / 2));
                pack_pixel_pairs(v, at.add(len));
            }
        });
        let blocks = l.div_ceil(QV * LANES);
        let (words, out) = (SyncPtr::of(packed.as_ptr()), SyncPtr(out.as_mut_ptr()));
        super::par::for_each(n * blocks, |item| {
            let (b, i0) = (item / blocks, item % blocks * QV * LANES);
            WEIGHTS.with(|weights| {
                let (scores, pairs) = &mut *weights.borrow_mut();
                scores.resize(l * QV * LANES, 0.0);
                pairs.resize(l / 2 * QV * LANES, 0);
                // SAFETY: image b's packed words and output lie inside the buffers (sizes
                // above and checked against the shape).
                let io = unsafe {
                    let at = words.ptr().add(b * image).cast_const();
                    Io {
                        q: at,
                        k: at.add(len / 2),
                        v: at.add(len),
                        out: out.ptr().add(b * len),
                        scores: scores.as_mut_ptr(),
                        pairs: pairs.as_mut_ptr(),
                        c,
                        l,
                        i0,
                        scale,
                    }
                };
                // SAFETY: the CPU has AVX-512F and BF16 (checked above); the item writes only
                // the columns of its own queries of image b.
                unsafe {
                    match ((l - i0) / LANES).min(QV) {
                        1 => block::<1>(io),
                        2 => block::<2>(io),
                        _ => block::<QV>(io),
                    }
                }
            });
        });
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The packed images of one call, on the calling thread.
    static PACKED: std::cell::RefCell<Vec<i32>> = std::cell::RefCell::default();
    /// Per thread, one block's f32 scores (`pixels x 48`) and its softmax weights as key pairs
    /// (`pixels / 2 x 48` words).
    static WEIGHTS: std::cell::RefCell<(Vec<f32>, Vec<i32>)> = std::cell::RefCell::default();
}

/// One query block's buffers and position (words are bf16 pairs).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Io {
    q: *const i32,
    k: *const i32,
    v: *const i32,
    out: *mut f32,
    scores: *mut f32,
    pairs: *mut i32,
    c: usize,
    l: usize,
    i0: usize,
    scale: f32,
}

/// 16 words of bf16 pairs as the type `vdpbf16ps` takes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bh(words: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both types are 64 bytes of plain lanes; every bit pattern is valid in each.
    unsafe { std::mem::transmute::<std::arch::x86_64::__m512i, std::arch::x86_64::__m512bh>(words) }
}

/// `lo` and `hi` rounded to bf16 (nearest even) and packed lane by lane into words with `lo` in
/// the low half, as `vdpbf16ps` reads pairs. Inputs are finite.
/// Safety: AVX-512F (no memory is touched).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_pairs(
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // Adding 0x7fff plus the lowest kept bit, then dropping the low 16 bits, rounds to nearest
    // with ties to even.
    let round = |v: __m512| {
        let x = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        _mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)))
    };
    let high = _mm512_and_si512(round(hi), _mm512_set1_epi32(0xffff_0000_u32 as i32));
    _mm512_or_si512(_mm512_srli_epi32::<16>(round(lo)), high)
}

/// `x` (`c x l` f32) as `[c / 2][l]` words: word (d, i) holds channels 2d and 2d + 1 of pixel
/// i. Safety: AVX-512F; `x` has `c * l` values, c even, l a multiple of 16, `dst` room for
/// `c * l / 2` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_channel_pairs(x: &[f32], c: usize, l: usize, dst: *mut i32) {
    use std::arch::x86_64::*;
    let x = x.as_ptr();
    for d in 0..c / 2 {
        for i in (0..l).step_by(LANES) {
            let lo = _mm512_loadu_ps(x.add(2 * d * l + i));
            let hi = _mm512_loadu_ps(x.add((2 * d + 1) * l + i));
            _mm512_storeu_si512(dst.add(d * l + i).cast(), bf16_pairs(lo, hi));
        }
    }
}

/// `x` (`c x l` f32, l even) as `[c][l / 2]` words: word (ch, j) holds pixels 2j and 2j + 1
/// of channel ch, i.e. the whole tensor as consecutive bf16 values (rows have even lengths, so
/// no pair straddles two rows).
/// Safety: AVX-512F and BF16; `x` has a multiple of 32 values, `dst` room for half as many
/// words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_pixel_pairs(x: &[f32], dst: *mut i32) {
    use std::arch::x86_64::*;
    for (m, chunk) in x.chunks_exact(2 * LANES).enumerate() {
        let first = _mm512_loadu_ps(chunk.as_ptr());
        let second = _mm512_loadu_ps(chunk.as_ptr().add(LANES));
        // The first argument's values land in the upper half of the result.
        // SAFETY: both types are 64 bytes of plain lanes; every bit pattern is valid in each.
        let packed = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(second, first));
        _mm512_storeu_si512(dst.add(m * LANES).cast(), packed);
    }
}

/// Queries `i0 .. i0 + N * 16`: scores, softmax, output.
/// Safety: AVX-512F and BF16; `io` as [`attend_images`] builds it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const N: usize>(io: Io) {
    use super::simd::{Avx512, Simd};
    use std::arch::x86_64::*;
    let l = io.l;
    let row_len = QV * LANES;
    for j0 in (0..l).step_by(TR) {
        score_tile::<N>(io, j0, row_len);
    }
    // Softmax over keys = over the rows of the scores, lane-wise; the weights are stored as
    // pairs of rows.
    let row = |j: usize, p: usize| io.scores.add(j * row_len + p * LANES);
    let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); N];
    for j in 0..l {
        for (p, m) in max.iter_mut().enumerate() {
            *m = _mm512_max_ps(*m, _mm512_loadu_ps(row(j, p)));
        }
    }
    let mut sum = [_mm512_setzero_ps(); N];
    for j in (0..l).step_by(2) {
        for p in 0..N {
            let e0 = Avx512::exp(_mm512_sub_ps(_mm512_loadu_ps(row(j, p)), max[p]));
            let e1 = Avx512::exp(_mm512_sub_ps(_mm512_loadu_ps(row(j + 1, p)), max[p]));
            sum[p] = _mm512_add_ps(_mm512_add_ps(sum[p], e0), e1);
            let at = io.pairs.add(j / 2 * row_len + p * LANES);
            _mm512_storeu_si512(at.cast(), bf16_pairs(e0, e1));
        }
    }
    let inv = sum.map(|s| _mm512_div_ps(_mm512_set1_ps(1.0), s));
    for ch0 in (0..io.c).step_by(TR) {
        value_tile::<N>(io, ch0, row_len, inv);
    }
}

/// Scores of keys `j0 .. j0 + TR` for the block's queries, scaled, into the score rows.
/// Safety: AVX-512F and BF16; `io` as [`attend_images`] builds it, `N <= QV`,
/// `io.i0 + 16 * N <= io.l`, `j0 + TR <= io.l` and `row_len` is `QV * LANES`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn score_tile<const N: usize>(io: Io, j0: usize, row_len: usize) {
    use std::arch::x86_64::*;
    let (l, i0) = (io.l, io.i0);
    let mut acc = [[_mm512_setzero_ps(); N]; TR];
    for d in 0..io.c / 2 {
        let qd = io.q.add(d * l + i0);
        let kd = io.k.add(d * l + j0);
        let mut qv = [_mm512_setzero_si512(); N];
        for (p, qv) in qv.iter_mut().enumerate() {
            *qv = _mm512_loadu_si512(qd.add(p * LANES).cast());
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let kv = bh(_mm512_set1_epi32(*kd.add(r)));
            for p in 0..N {
                row[p] = _mm512_dpbf16_ps(row[p], bh(qv[p]), kv);
            }
        }
    }
    let scale = _mm512_set1_ps(io.scale);
    for (r, row) in acc.iter().enumerate() {
        for (p, &a) in row.iter().enumerate() {
            _mm512_storeu_ps(
                io.scores.add((j0 + r) * row_len + p * LANES),
                _mm512_mul_ps(a, scale),
            );
        }
    }
}

/// Output channels `ch0 .. ch0 + TR` of the block's queries: the weighted values times `inv`.
/// Safety: AVX-512F and BF16; `io` as [`attend_images`] builds it, `N <= QV`,
/// `io.i0 + 16 * N <= io.l`, `ch0 + TR <= io.c` and `row_len` is `QV * LANES`; no other thread
/// writes these queries' columns of `io.out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn value_tile<const N: usize>(
    io: Io,
    ch0: usize,
    row_len: usize,
    inv: [std::arch::x86_64::__m512; N],
) {
    use std::arch::x86_64::*;
    let (l, i0) = (io.l, io.i0);
    let mut acc = [[_mm512_setzero_ps(); N]; TR];
    let vc = io.v.add(ch0 * l / 2);
    for j in 0..l / 2 {
        let wj = io.pairs.add(j * row_len);
        let mut wv = [_mm512_setzero_si512(); N];
        for (p, wv) in wv.iter_mut().enumerate() {
            *wv = _mm512_loadu_si512(wj.add(p * LANES).cast());
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let vv = bh(_mm512_set1_epi32(*vc.add(r * l / 2 + j)));
            for p in 0..N {
                row[p] = _mm512_dpbf16_ps(row[p], bh(wv[p]), vv);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (p, &a) in row.iter().enumerate() {
            _mm512_storeu_ps(io.out.add((ch0 + r) * l + i0 + p * LANES), _mm512_mul_ps(a, inv[p]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values::values;

    /// f64 attention of the inputs rounded to bf16, and the largest |score|.
    fn reference(c: usize, l: usize, scale: f64, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; c * l];
        for i in 0..l {
            let scores: Vec<f64> = (0..l)
                .map(|j| {
                    scale * (0..c).map(|d| q[d * l + i] as f64 * k[d * l + j] as f64).sum::<f64>()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for ch in 0..c {
                out[ch * l + i] = (0..l).map(|j| e[j] / sum * v[ch * l + j] as f64).sum();
            }
        }
        out
    }

    /// `v` rounded to bf16, nearest even.
    fn bf16(v: f32) -> f32 {
        let x = v.to_bits();
        f32::from_bits((x + 0x7fff + ((x >> 16) & 1)) & 0xffff_0000)
    }

    #[test]
    fn matches_the_reference_within_bf16_rounding() {
        if !supported() {
            crate::test_skip::note("bf16 attention: this CPU has no AVX-512 BF16, never used here");
            return;
        }
        // Query blocks of 1, 2, 3 and 3 + 1 vectors, one to ten channel tiles, flat and peaked
        // softmaxes.
        let cases = [(16, 16, 0.25), (32, 32, 0.5), (32, 48, 1.0), (64, 64, 0.125), (80, 256, 1.0)];
        for (c, l, scale) in cases {
            let (q, k, v) = (values(c * l, 1), values(c * l, 2), values(c * l, 3));
            let shape = AttentionShape { channels: c, pixels: l };
            let case = format!("c={c} l={l}");
            let [two, two2, two3] = crate::backend::par::on_thread_counts(|| {
                let mut out = vec![f32::NAN; 2 * c * l];
                let qkv = |b: usize| {
                    if b == 0 {
                        [&k[..], &q[..], &v[..]]
                    } else {
                        [&q[..], &k[..], &v[..]]
                    }
                };
                attend_images(shape, scale, 2, qkv, &mut out).expect("runs");
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            });
            assert!(two == two2 && two == two3, "{case}: thread counts change the bits");
            let got: Vec<f32> = two[c * l..].iter().map(|&b| f32::from_bits(b)).collect();
            let round = |x: &[f32]| x.iter().map(|&v| bf16(v)).collect::<Vec<_>>();
            // Against the exact attention of the rounded inputs, what is left is the rounding
            // of the weights (2^-9 relative each, averaging over the keys) and f32 sums.
            let want = reference(c, l, scale as f64, &round(&q), &round(&k), &round(&v));
            let exact = reference(c, l, scale as f64, &q, &k, &v);
            let rms = |a: &[f64]| (a.iter().map(|x| x * x).sum::<f64>() / a.len() as f64).sqrt();
            let err: Vec<f64> = got.iter().zip(&want).map(|(&g, &w)| g as f64 - w).collect();
            let full: Vec<f64> = got.iter().zip(&exact).map(|(&g, &w)| g as f64 - w).collect();
            let (err, full, size) = (rms(&err), rms(&full), rms(&exact));
            // Measured: 0.7-1.4e-3 and 1.9-4.1e-3 of the output's RMS; a mispaired operand is
            // off by the output's size.
            assert!(
                err <= 3e-3 * size,
                "{case}: {err} from the rounded inputs' attention ({size})"
            );
            // And against f32 attention, within bf16's precision.
            assert!(full <= 1e-2 * size, "{case}: {full} from the exact attention ({size})");
            let largest =
                got.iter().zip(&exact).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(largest <= 0.05 * (1.0 + size), "{case}: worst value off by {largest}");
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        let shape = AttentionShape { channels: 16, pixels: 20 };
        let z = [0.0; 320];
        let err = attend_images(shape, 1.0, 1, |_| [&z[..], &z[..], &z[..]], &mut [0.0; 320]);
        assert!(err.unwrap_err().contains("16 channels x 20 pixels"));
        let shape = AttentionShape { channels: 16, pixels: 16 };
        let (a, b) = ([0.0; 256], [0.0; 255]);
        let err = attend_images(shape, 1.0, 1, |_| [&a[..], &b[..], &a[..]], &mut [0.0; 256]);
        assert!(err.unwrap_err().contains("256/255/256/256 values for 1 x 16 x 16"));
    }
}
