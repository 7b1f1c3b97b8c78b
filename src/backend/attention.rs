//! Single-head spatial self-attention, f32, for x86-64 CPUs with AVX-512: for one image with
//! queries, keys and values `q`, `k`, `v` (each `c x l`: `c` channels of `l` pixels),
//! `out[:, i] = sum_j softmax_j(scale * q[:, i] . k[:, j]) v[:, j]`.
//!
//! Why it exists: tract 0.23.9 runs the denoisers' attention blocks as two einsums (packing
//! both operands, the score matrix included), a separate Softmax pass with a scalar-speed exp
//! and two axis moves: ~20 % of a denoiser_s call at 67-84 GFLOP/s and 1.3 ns per softmax
//! value. Here everything runs on the transposed scores `s[j][i]` of a block of up to
//! [`QV`] x 16 queries: both products are the broadcast-FMA register tiles of
//! [`super::direct_conv`] with vectors along the queries, the softmax over keys becomes
//! lane-wise maxima and sums over rows (no horizontal reductions), its 1/sum is applied to the
//! output tile, and the output rows are written in place (no transposes). A block's scores stay
//! in L1/L2.
//!
//! Summation order and the exp differ from tract's, so results agree to float rounding
//! (relative ~1e-6), not bit for bit.

/// Query vectors per block (register tile columns).
const QV: usize = 3;
/// Register tile rows: keys in the score product, channels in the value product.
const TR: usize = 8;
/// f32 lanes of one AVX-512 vector.
const LANES: usize = 16;

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Channels of the queries, keys and values (a multiple of 16).
    pub channels: usize,
    /// Pixels (tokens) per image (a multiple of 16).
    pub pixels: usize,
}

impl AttentionShape {
    /// True when the kernel handles these sizes: both multiples of 16 and non-zero.
    pub fn fits(&self) -> bool {
        self.channels > 0
            && self.pixels > 0
            && self.channels.is_multiple_of(LANES)
            && self.pixels.is_multiple_of(LANES)
    }
}

/// True when this CPU can run the kernel (x86-64 with AVX-512F, detected at run time).
pub fn supported() -> bool {
    super::direct_conv::DirectConv::supported()
}

/// Attention of one image: `q`, `k`, `v` and `out` are `channels x pixels`, row-major.
/// Errors when a slice length disagrees with `shape`, the shape does not [fit](AttentionShape::fits)
/// or the CPU lacks AVX-512.
#[cfg_attr(not(test), allow(dead_code))]
pub fn attend(
    shape: AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) -> Result<(), String> {
    attend_images(shape, scale, 1, |_| [q, k, v], out)
}

/// Attention of `n` images: `qkv(b)` are image `b`'s queries, keys and values and `out` holds
/// the `n` outputs, each `channels x pixels`, row-major. (image, query block) items are split
/// over the pool of [`super::par`]. Errors as [`attend`] does.
pub fn attend_images<'a>(
    shape: AttentionShape,
    scale: f32,
    n: usize,
    qkv: impl Fn(usize) -> [&'a [f32]; 3] + Sync,
    out: &mut [f32],
) -> Result<(), String> {
    let len = shape.channels * shape.pixels;
    if !shape.fits() {
        return Err(format!(
            "attention: {} channels x {} pixels are not whole vectors of 16",
            shape.channels, shape.pixels
        ));
    }
    for b in 0..n {
        let [q, k, v] = qkv(b);
        if [q.len(), k.len(), v.len()].iter().any(|&m| m != len) || out.len() != n * len {
            return Err(format!(
                "attention: q/k/v/out of {}/{}/{}/{} values for {n} x {} x {}",
                q.len(),
                k.len(),
                v.len(),
                out.len(),
                shape.channels,
                shape.pixels
            ));
        }
    }
    if !supported() {
        return Err("attention: this CPU has no AVX-512".into());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (c, l) = (shape.channels, shape.pixels);
        let blocks = l.div_ceil(QV * LANES);
        let out = super::par::SyncPtr(out.as_mut_ptr());
        super::par::for_each(n * blocks, |item| {
            let (b, i0) = (item / blocks, item % blocks * QV * LANES);
            let [q, k, v] = qkv(b);
            SCORES.with(|scores| {
                let scores = &mut *scores.borrow_mut();
                scores.resize(l * QV * LANES, 0.0);
                let io = Io {
                    q: q.as_ptr(),
                    k: k.as_ptr(),
                    v: v.as_ptr(),
                    // SAFETY: image b's output lies inside `out` (its length was checked).
                    out: unsafe { out.ptr().add(b * len) },
                };
                // SAFETY: AVX-512F was detected above; the lengths were checked against the
                // shape, `scores` holds `l` rows of QV vectors, and the item writes only the
                // columns of its own queries of image b.
                unsafe {
                    match ((l - i0) / LANES).min(QV) {
                        1 => block::<1>(io, c, l, i0, scale, scores),
                        2 => block::<2>(io, c, l, i0, scale, scores),
                        _ => block::<QV>(io, c, l, i0, scale, scores),
                    }
                }
            });
        });
    }
    Ok(())
}

thread_local! {
    /// Per-thread transposed scores of one query block, `pixels x QV x 16` (48 KB at 256
    /// pixels), kept between calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::default();
}

/// The image's buffers, `channels x pixels` each.
#[derive(Clone, Copy)]
struct Io {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
}

/// Queries `i0 .. i0 + N*16`: scores, softmax, output. `scores` rows are `QV * 16` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block<const N: usize>(
    io: Io,
    c: usize,
    l: usize,
    i0: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let st = scores.as_mut_ptr();
    for j0 in (0..l).step_by(TR) {
        score_tile::<N>(io.q, io.k, c, l, i0, j0, scale, st);
    }
    // Softmax over keys = over the rows of `st`, lane-wise.
    let row = |j: usize, p: usize| st.add(j * QV * LANES + p * LANES);
    let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); N];
    for j in 0..l {
        for (p, m) in max.iter_mut().enumerate() {
            *m = _mm512_max_ps(*m, _mm512_loadu_ps(row(j, p)));
        }
    }
    let mut sum = [_mm512_setzero_ps(); N];
    for j in 0..l {
        for p in 0..N {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(row(j, p)), max[p]));
            sum[p] = _mm512_add_ps(sum[p], e);
            _mm512_storeu_ps(row(j, p), e);
        }
    }
    let inv = sum.map(|s| _mm512_div_ps(_mm512_set1_ps(1.0), s));
    for ch0 in (0..c).step_by(TR) {
        value_tile::<N>(st, io.v, io.out, l, i0, ch0, inv);
    }
}

/// `st[j0 + r][..N*16] = scale * sum_d k[d][j0 + r] * q[d][i0 + ..]` for the tile's `TR` keys.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn score_tile<const N: usize>(
    q: *const f32,
    k: *const f32,
    c: usize,
    l: usize,
    i0: usize,
    j0: usize,
    scale: f32,
    st: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); N]; TR];
    for d in 0..c {
        let qd = q.add(d * l + i0);
        let kd = k.add(d * l + j0);
        let mut qv = [_mm512_setzero_ps(); N];
        for (p, qv) in qv.iter_mut().enumerate() {
            *qv = _mm512_loadu_ps(qd.add(p * LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let kv = _mm512_set1_ps(*kd.add(r));
            for p in 0..N {
                row[p] = _mm512_fmadd_ps(kv, qv[p], row[p]);
            }
        }
    }
    let scale = _mm512_set1_ps(scale);
    for (r, row) in acc.iter().enumerate() {
        for (p, &a) in row.iter().enumerate() {
            _mm512_storeu_ps(st.add((j0 + r) * QV * LANES + p * LANES), _mm512_mul_ps(a, scale));
        }
    }
}

/// `out[ch0 + r][i0 + ..N*16] = inv * sum_j v[ch0 + r][j] * st[j][..]` for `TR` channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn value_tile<const N: usize>(
    st: *const f32,
    v: *const f32,
    out: *mut f32,
    l: usize,
    i0: usize,
    ch0: usize,
    inv: [std::arch::x86_64::__m512; N],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); N]; TR];
    let vc = v.add(ch0 * l);
    for j in 0..l {
        let sj = st.add(j * QV * LANES);
        let mut pv = [_mm512_setzero_ps(); N];
        for (p, pv) in pv.iter_mut().enumerate() {
            *pv = _mm512_loadu_ps(sj.add(p * LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let vv = _mm512_set1_ps(*vc.add(r * l + j));
            for p in 0..N {
                row[p] = _mm512_fmadd_ps(vv, pv[p], row[p]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (p, &a) in row.iter().enumerate() {
            _mm512_storeu_ps(out.add((ch0 + r) * l + i0 + p * LANES), _mm512_mul_ps(a, inv[p]));
        }
    }
}

/// `e^x` on 16 lanes for x <= 0 (softmax arguments), within ~2 ulp: x = n ln 2 + r with
/// |r| <= ln 2 / 2, Cephes' degree-7 polynomial for e^r, and 2^n applied by `vscalefps`
/// (which also takes care of underflow to 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for coefficient in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(coefficient));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(y, n)
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
    fn matches_the_reference_on_whole_and_partial_tiles() {
        if !supported() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // Pixels 16/32/48/64/80: query blocks of 1, 2 and 3 vectors and 3 + 1, 3 + 2;
        // channels 16..80 cover one to ten channel tiles. Scales up to 3 make peaked softmaxes
        // (scores of tens) as well as flat ones.
        let cases = [(16, 16, 0.25), (32, 32, 0.5), (32, 48, 1.0), (64, 64, 0.125), (80, 80, 3.0)];
        for (c, l, scale) in cases {
            let (q, k, v) = (values(c * l, 1), values(c * l, 2), values(c * l, 3));
            let mut out = vec![f32::NAN; c * l];
            let shape = AttentionShape { channels: c, pixels: l };
            attend(shape, scale, &q, &k, &v, &mut out).expect("runs");
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
                attend_images(shape, scale, 2, qkv, &mut out).expect("runs");
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            });
            assert!(two == two2 && two == two3, "c={c} l={l}: thread counts change the bits");
            let alone: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert!(two[c * l..] == alone[..], "c={c} l={l}: batched differs from alone");
            let (want, largest) = reference(c, l, scale as f64, &q, &k, &v);
            // A score s carries f32 rounding of ~1e-7 |s|, which exp turns into that relative
            // error of the weights: the tolerance grows with the largest score.
            let tolerance = 1e-6 * (1.0 + largest);
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= tolerance * (1.0 + want.abs()),
                    "c={c} l={l} value {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        if !supported() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let mut worst = 0f64;
            let mut x = -100.0f32;
            while x <= 0.0 {
                let xs: [f32; 16] = std::array::from_fn(|i| x - i as f32 * 1e-3);
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F is present (checked above); both arrays hold 16 f32.
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp(_mm512_loadu_ps(xs.as_ptr()))) };
                for (&g, &x) in got.iter().zip(&xs) {
                    let want = (x as f64).exp();
                    if want > 1e-37 {
                        worst = worst.max((g as f64 - want).abs() / want);
                    }
                }
                x += 0.0137;
            }
            assert!(worst < 4e-7, "largest relative error {worst:e}");
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        let shape = AttentionShape { channels: 16, pixels: 20 };
        let err = attend(shape, 1.0, &[0.0; 320], &[0.0; 320], &[0.0; 320], &mut [0.0; 320]);
        assert!(err.unwrap_err().contains("16 channels x 20 pixels"));
        let shape = AttentionShape { channels: 16, pixels: 16 };
        let err = attend(shape, 1.0, &[0.0; 256], &[0.0; 255], &[0.0; 256], &mut [0.0; 256]);
        assert!(err.unwrap_err().contains("256/255/256/256 values for 1 x 16 x 16"));
    }
}
