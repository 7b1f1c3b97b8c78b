//! Single-head spatial self-attention, f32, on every [`KernelLevel`] but `tract`: for one image
//! with queries, keys and values `q`, `k`, `v` (each `c x l`: `c` channels of `l` pixels),
//! `out[:, i] = sum_j softmax_j(scale * q[:, i] . k[:, j]) v[:, j]`.
//!
//! Why it exists: tract 0.23.9 runs the denoisers' attention blocks as two einsums (packing
//! both operands, the score matrix included), a separate Softmax pass with a scalar-speed exp
//! and two axis moves: ~20 % of a denoiser_s call at 67-84 GFLOP/s and 1.3 ns per softmax
//! value. Here everything runs on the transposed scores `s[j][i]` of a block of up to `QV`
//! query vectors: both products are the broadcast-FMA register tiles of
//! [`super::direct_conv`] with vectors along the queries, the softmax over keys becomes
//! lane-wise maxima and sums over rows (no horizontal reductions), its 1/sum is applied to the
//! output tile, and the output rows are written in place (no transposes). A block's scores stay
//! in L1/L2. The kernel is written once over [`Simd`]; each level has its own tile
//! ([`Tiles`]: AVX-512's 32 registers hold 8 x 3 accumulators, AVX2's 16 hold 4 x 2: 4 x 3
//! leaves none free and LLVM spills accumulators; the portable 8-lane arrays also 4 x 2).
//!
//! Summation order and the exp differ from tract's, so results agree to float rounding
//! (relative ~1e-6), not bit for bit; each level sums in its own order.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, PortableFma};
use super::simd::{KernelLevel, Portable, Simd};

/// Query vectors per block of the portable kernel: 4 x 2 of its 8-lane arrays fill NEON's 32
/// registers (and AVX2's 16 at the portable-fma level); SSE2's 16 (x86-64 without AVX2) hold
/// 4 x 1 without spilling accumulators.
#[cfg(target_arch = "aarch64")]
const PORTABLE_QV: usize = PORTABLE_FMA_QV;
#[cfg(not(target_arch = "aarch64"))]
const PORTABLE_QV: usize = 1;
/// Query vectors per block of the portable-fma level (aarch64's portable tile).
const PORTABLE_FMA_QV: usize = 2;

/// A level's register tile: up to `qv` query vectors (x `TR` rows: keys in the score product,
/// channels in the value product, a const parameter of [`block`]).
#[derive(Debug, Clone, Copy)]
struct Tiles {
    qv: usize,
    lanes: usize,
}

impl Tiles {
    fn of(level: KernelLevel) -> Option<Tiles> {
        match level {
            KernelLevel::Avx512 => Some(Tiles { qv: 3, lanes: 16 }),
            KernelLevel::Avx2 => Some(Tiles { qv: 2, lanes: 8 }),
            KernelLevel::Portable => Some(Tiles { qv: PORTABLE_QV, lanes: 8 }),
            KernelLevel::PortableFma => Some(Tiles { qv: PORTABLE_FMA_QV, lanes: 8 }),
            KernelLevel::Tract => None,
        }
    }

    /// Queries per block.
    fn queries(&self) -> usize {
        self.qv * self.lanes
    }
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Channels of the queries, keys and values (a multiple of 16).
    pub channels: usize,
    /// Pixels (tokens) per image (a multiple of 16).
    pub pixels: usize,
}

impl AttentionShape {
    /// True when the kernel handles these sizes: both multiples of 16 (whole vectors and row
    /// tiles on every level) and non-zero.
    pub fn fits(&self) -> bool {
        self.channels > 0
            && self.pixels > 0
            && self.channels.is_multiple_of(16)
            && self.pixels.is_multiple_of(16)
    }
}

/// Attention of one image on `level` (the tests' form): `q`, `k`, `v` and `out` are
/// `channels x pixels`, row-major. Errors as [`attend_images`] does.
#[cfg(test)]
pub fn attend(
    level: KernelLevel,
    shape: AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) -> Result<(), String> {
    attend_images(level, shape, scale, 1, |_| [q, k, v], out)
}

/// Attention of `n` images on `level`: `qkv(b)` are image `b`'s queries, keys and values and
/// `out` holds the `n` outputs, each `channels x pixels`, row-major. (image, query block) items
/// are split over the pool of [`super::par`]. Errors when a slice length disagrees with
/// `shape`, the shape does not [fit](AttentionShape::fits), the level is `tract` or the CPU
/// cannot run it.
pub fn attend_images<'a>(
    level: KernelLevel,
    shape: AttentionShape,
    scale: f32,
    n: usize,
    qkv: impl Fn(usize) -> [&'a [f32]; 3],
    out: &mut [f32],
) -> Result<(), String> {
    let len = shape.channels * shape.pixels;
    let images = checked_images(shape, n, &qkv, out.len())?;
    let tiles = match Tiles::of(level) {
        Some(t) if level.supported() => t,
        _ => return Err(format!("attention: kernel level {} cannot run here", level.name())),
    };
    let (c, l) = (shape.channels, shape.pixels);
    let blocks = l.div_ceil(tiles.queries());
    let out = super::par::SyncPtr(out.as_mut_ptr());
    super::par::for_each(n * blocks, |item| {
        let (b, i0) = (item / blocks, item % blocks * tiles.queries());
        let [q, k, v] = images[b];
        SCORES.with(|scores| {
            let scores = &mut *scores.borrow_mut();
            scores.resize(l * tiles.queries(), 0.0);
            let io = Io {
                q: q.as_ptr(),
                k: k.as_ptr(),
                v: v.as_ptr(),
                // SAFETY: image b's output lies inside `out` (its length was checked).
                out: unsafe { out.ptr().add(b * len) },
                scores: scores.as_mut_ptr(),
                c,
                l,
                i0,
                scale,
            };
            let vectors = ((l - i0) / tiles.lanes).min(tiles.qv);
            // SAFETY: the level runs on this CPU (checked above); the lengths were checked
            // against the shape, `scores` holds `l` rows of `qv` vectors, and the item writes
            // only the columns of its own queries of image b.
            unsafe { run_block(level, io, vectors) }
        });
    });
    Ok(())
}

/// The `n` images' `qkv` slices, asked for once: the kernels read through pointers taken from
/// exactly the slices whose lengths were checked here. Errors when `shape` does not
/// [fit](AttentionShape::fits) or a slice, or the output's `out_len`, disagrees with it (shared
/// with [`super::attention_bf16`]).
pub(crate) fn checked_images<'a>(
    shape: AttentionShape,
    n: usize,
    qkv: &impl Fn(usize) -> [&'a [f32]; 3],
    out_len: usize,
) -> Result<Vec<[&'a [f32]; 3]>, String> {
    let len = shape.channels * shape.pixels;
    if !shape.fits() {
        return Err(format!(
            "attention: {} channels x {} pixels are not whole vectors of 16",
            shape.channels, shape.pixels
        ));
    }
    let images: Vec<_> = (0..n).map(qkv).collect();
    for &[q, k, v] in &images {
        if [q.len(), k.len(), v.len()].iter().any(|&m| m != len) || out_len != n * len {
            return Err(format!(
                "attention: q/k/v/out of {}/{}/{}/{out_len} values for {n} x {} x {}",
                q.len(),
                k.len(),
                v.len(),
                shape.channels,
                shape.pixels
            ));
        }
    }
    Ok(images)
}

thread_local! {
    /// Per-thread transposed scores of one query block, `pixels x queries per block` (48 KB at
    /// 256 pixels), kept between calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::default();
}

/// One query block's buffers and position.
#[derive(Clone, Copy)]
struct Io {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    scores: *mut f32,
    c: usize,
    l: usize,
    i0: usize,
    scale: f32,
}

/// The block of `vectors` query vectors at `io.i0` on `level`'s tile.
/// Safety: the CPU runs `level`; `io` holds buffers of the shapes of [`attend_images`].
unsafe fn run_block(level: KernelLevel, io: Io, vectors: usize) {
    match (level, vectors) {
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::Avx512, 1) => avx512::<1>(io),
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::Avx512, 2) => avx512::<2>(io),
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::Avx512, _) => avx512::<3>(io),
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::Avx2, 1) => avx2::<1>(io),
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::Avx2, _) => avx2::<2>(io),
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::PortableFma, 1) => portable_fma::<1>(io),
        #[cfg(target_arch = "x86_64")]
        (KernelLevel::PortableFma, _) => portable_fma::<PORTABLE_FMA_QV>(io),
        (_, 1) => block::<Portable, 4, 1>(io, PORTABLE_QV),
        _ => block::<Portable, 4, PORTABLE_QV>(io, PORTABLE_QV),
    }
}

#[cfg(target_arch = "x86_64")]
/// [`block`] on AVX-512's tile: 8 rows x `N` of 3 query vectors.
/// Safety: the CPU supports AVX-512F; `io` as [`attend_images`] builds it at this level (score
/// rows of 3 vectors), with `N <= 3` and `io.i0 + 16 * N <= io.l`.
#[target_feature(enable = "avx512f")]
unsafe fn avx512<const N: usize>(io: Io) {
    block::<Avx512, 8, N>(io, 3)
}

#[cfg(target_arch = "x86_64")]
/// [`block`] on AVX2's tile: 4 rows x `N` of 2 query vectors.
/// Safety: the CPU supports AVX2 and FMA; `io` as [`attend_images`] builds it at this level
/// (score rows of 2 vectors), with `N <= 2` and `io.i0 + 8 * N <= io.l`.
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const N: usize>(io: Io) {
    block::<Avx2, 4, N>(io, 2)
}

#[cfg(target_arch = "x86_64")]
/// [`block`] on [`PortableFma`] vectors, compiled for AVX2 + FMA: 4 rows x `N` of
/// [`PORTABLE_FMA_QV`] query vectors.
/// Safety: the CPU supports AVX2 and FMA; `io` as [`attend_images`] builds it at this level,
/// with `N <= PORTABLE_FMA_QV` and `io.i0 + 8 * N <= io.l`.
#[target_feature(enable = "avx2,fma")]
unsafe fn portable_fma<const N: usize>(io: Io) {
    block::<PortableFma, 4, N>(io, PORTABLE_FMA_QV)
}

/// Queries `i0 .. i0 + N * LANES`: scores, softmax, output, on `TR`-row tiles; `qv` query
/// vectors make one row of the scores.
/// Safety: runs inside a function compiled for `S` on a CPU that has it; `io` as
/// [`attend_images`] builds it, with `io.scores` holding `io.l` rows of `qv * S::LANES`,
/// `N <= qv`, `io.i0 + N * S::LANES <= io.l` and `TR` dividing `io.c` and `io.l`; no other
/// thread touches `io.scores` or these queries' columns of `io.out`.
#[inline(always)]
unsafe fn block<S: Simd, const TR: usize, const N: usize>(io: Io, qv: usize) {
    let (c, l) = (io.c, io.l);
    let row_len = qv * S::LANES;
    let st = io.scores;
    for j0 in (0..l).step_by(TR) {
        score_tile::<S, TR, N>(io, j0, row_len);
    }
    // Softmax over keys = over the rows of `st`, lane-wise.
    let row = |j: usize, p: usize| st.add(j * row_len + p * S::LANES);
    let mut max = [S::splat(f32::NEG_INFINITY); N];
    for j in 0..l {
        for (p, m) in max.iter_mut().enumerate() {
            *m = S::max(*m, S::load(row(j, p)));
        }
    }
    let mut sum = [S::zero(); N];
    for j in 0..l {
        for p in 0..N {
            let e = S::exp(S::sub(S::load(row(j, p)), max[p]));
            sum[p] = S::add(sum[p], e);
            S::store(row(j, p), e);
        }
    }
    let inv = sum.map(|s| S::recip(s));
    for ch0 in (0..c).step_by(TR) {
        value_tile::<S, TR, N>(io, ch0, row_len, inv);
    }
}

/// `st[j0 + r][..N * LANES] = scale * sum_d k[d][j0 + r] * q[d][i0 + ..]` for the tile's `TR`
/// keys.
/// Safety: as [`block`], with `j0 + TR <= io.l` and `row_len` the score rows' length.
#[inline(always)]
unsafe fn score_tile<S: Simd, const TR: usize, const N: usize>(io: Io, j0: usize, row_len: usize) {
    let (c, l, i0) = (io.c, io.l, io.i0);
    let mut acc = [[S::zero(); N]; TR];
    for d in 0..c {
        let qd = io.q.add(d * l + i0);
        let kd = io.k.add(d * l + j0);
        let mut qv = [S::zero(); N];
        for (p, qv) in qv.iter_mut().enumerate() {
            *qv = S::load(qd.add(p * S::LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let kv = S::splat(*kd.add(r));
            for p in 0..N {
                row[p] = S::fma(kv, qv[p], row[p]);
            }
        }
    }
    let scale = S::splat(io.scale);
    for (r, row) in acc.iter().enumerate() {
        for (p, &a) in row.iter().enumerate() {
            S::store(io.scores.add((j0 + r) * row_len + p * S::LANES), S::mul(a, scale));
        }
    }
}

/// `out[ch0 + r][i0 + ..N * LANES] = inv * sum_j v[ch0 + r][j] * st[j][..]` for `TR` channels.
/// Safety: as [`block`], with `ch0 + TR <= io.c` and `row_len` the score rows' length.
#[inline(always)]
unsafe fn value_tile<S: Simd, const TR: usize, const N: usize>(
    io: Io,
    ch0: usize,
    row_len: usize,
    inv: [S::V; N],
) {
    let (l, i0) = (io.l, io.i0);
    let mut acc = [[S::zero(); N]; TR];
    let vc = io.v.add(ch0 * l);
    for j in 0..l {
        let sj = io.scores.add(j * row_len);
        let mut pv = [S::zero(); N];
        for (p, pv) in pv.iter_mut().enumerate() {
            *pv = S::load(sj.add(p * S::LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let vv = S::splat(*vc.add(r * l + j));
            for p in 0..N {
                row[p] = S::fma(vv, pv[p], row[p]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (p, &a) in row.iter().enumerate() {
            S::store(io.out.add((ch0 + r) * l + i0 + p * S::LANES), S::mul(a, inv[p]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values::values;

    /// Plain f64 attention, and the largest |score|.
    fn reference(
        c: usize,
        l: usize,
        scale: f64,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> (Vec<f64>, f64) {
        let mut out = vec![0f64; c * l];
        let mut largest = 0f64;
        for i in 0..l {
            let scores: Vec<f64> = (0..l)
                .map(|j| {
                    scale * (0..c).map(|d| q[d * l + i] as f64 * k[d * l + j] as f64).sum::<f64>()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            largest = scores.iter().fold(largest, |m, s| m.max(s.abs()));
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for ch in 0..c {
                out[ch * l + i] = (0..l).map(|j| e[j] / sum * v[ch * l + j] as f64).sum();
            }
        }
        (out, largest)
    }

    #[test]
    fn matches_the_reference_on_whole_and_partial_tiles_on_every_level() {
        // Pixels 16/32/48/64/80: query blocks of 1, 2 and 3 vectors and 3 + 1, 3 + 2 (16
        // lanes; 8 lanes: 2, 4 = 3 + 1, ... 10 = 3 + 3 + 3 + 1); channels 16..80 cover one to
        // twenty row tiles. Scales up to 3 make peaked softmaxes (scores of tens) as well as
        // flat ones.
        let cases = [(16, 16, 0.25), (32, 32, 0.5), (32, 48, 1.0), (64, 64, 0.125), (80, 80, 3.0)];
        for level in crate::backend::simd::levels_under_test() {
            for (c, l, scale) in cases {
                let (q, k, v) = (values(c * l, 1), values(c * l, 2), values(c * l, 3));
                let mut out = vec![f32::NAN; c * l];
                let shape = AttentionShape { channels: c, pixels: l };
                let case = format!("{} c={c} l={l}", level.name());
                attend(level, shape, scale, &q, &k, &v, &mut out).expect("runs");
                // Two images on 1, 2 and 3 threads: each image as alone, bit for bit.
                let [two, two2, two3] = crate::backend::par::on_thread_counts(|| {
                    let mut out = vec![f32::NAN; 2 * c * l];
                    let qkv = |b: usize| {
                        if b == 0 {
                            [&k[..], &q[..], &v[..]]
                        } else {
                            [&q[..], &k[..], &v[..]]
                        }
                    };
                    attend_images(level, shape, scale, 2, qkv, &mut out).expect("runs");
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                });
                assert!(two == two2 && two == two3, "{case}: thread counts change the bits");
                let alone: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert!(two[c * l..] == alone[..], "{case}: batched differs from alone");
                let (want, largest) = reference(c, l, scale as f64, &q, &k, &v);
                // A score s carries f32 rounding of ~1e-7 |s|, which exp turns into that
                // relative error of the weights: the tolerance grows with the largest score.
                let tolerance = 1e-6 * (1.0 + largest);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= tolerance * (1.0 + want.abs()),
                        "{case} value {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// `qkv` of two images that answers with empty slices after its first two calls, counting
    /// them in `calls`.
    fn changing<'a>(
        calls: &'a std::cell::Cell<usize>,
        [q, k, v]: [&'a [f32]; 3],
    ) -> impl Fn(usize) -> [&'a [f32]; 3] + 'a {
        move |_| {
            calls.set(calls.get() + 1);
            if calls.get() <= 2 {
                [q, k, v]
            } else {
                [&q[..0], &k[..0], &v[..0]]
            }
        }
    }

    #[test]
    fn asks_for_each_image_once_so_the_checked_slices_are_the_ones_read() {
        // A caller whose `qkv` changes its answer must not get reads through unchecked slices:
        // each image is asked for exactly once, before the check, and the kernels read those.
        let (c, l) = (16, 32);
        let shape = AttentionShape { channels: c, pixels: l };
        let (q, k, v) = (values(c * l, 1), values(c * l, 2), values(c * l, 3));
        for level in crate::backend::simd::levels_under_test() {
            let mut alone = vec![f32::NAN; c * l];
            attend(level, shape, 0.5, &q, &k, &v, &mut alone).expect("runs");
            let calls = std::cell::Cell::new(0);
            let mut out = vec![f32::NAN; 2 * c * l];
            let qkv = changing(&calls, [&q, &k, &v]);
            attend_images(level, shape, 0.5, 2, qkv, &mut out).expect("runs");
            assert_eq!(calls.get(), 2, "{}: one call per image", level.name());
            assert!(out[..c * l] == alone[..] && out[c * l..] == alone[..], "{}", level.name());
        }
        if super::super::attention_bf16::supported() {
            let calls = std::cell::Cell::new(0);
            let mut out = vec![f32::NAN; 2 * c * l];
            let qkv = changing(&calls, [&q, &k, &v]);
            super::super::attention_bf16::attend_images(shape, 0.5, 2, qkv, &mut out)
                .expect("runs");
            assert_eq!(calls.get(), 2, "bf16: one call per image");
            assert!(out[..c * l] == out[c * l..], "bf16: both images alike");
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        let shape = AttentionShape { channels: 16, pixels: 20 };
        let err = attend(
            KernelLevel::Portable,
            shape,
            1.0,
            &[0.0; 320],
            &[0.0; 320],
            &[0.0; 320],
            &mut [0.0; 320],
        );
        assert!(err.unwrap_err().contains("16 channels x 20 pixels"));
        let shape = AttentionShape { channels: 16, pixels: 16 };
        let err = attend(
            KernelLevel::Portable,
            shape,
            1.0,
            &[0.0; 256],
            &[0.0; 255],
            &[0.0; 256],
            &mut [0.0; 256],
        );
        assert!(err.unwrap_err().contains("256/255/256/256 values for 1 x 16 x 16"));
        let ok = [0.0; 256];
        let err = attend(KernelLevel::Tract, shape, 1.0, &ok, &ok, &ok, &mut [0.0; 256]);
        assert!(err.unwrap_err().contains("kernel level tract cannot run here"));
    }
}
