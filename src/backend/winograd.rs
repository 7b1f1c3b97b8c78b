//! Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions of [`super::direct_conv`]: 16
//! multiplies per 2x2 output tile and channel pair instead of 36, 2.25x fewer.
//!
//! Why: on one core the direct conv already runs at the FMA peak (measured 255 GFLOP/s on a
//! 64-channel 32x32 conv on this Zen 5 core: 2 x 512-bit FMAs a cycle), and onnxruntime is close
//! behind, so going faster needs less arithmetic (issue 14 item 4).
//!
//! Status: opt-in ([`super::direct_conv::WINOGRAD_ENV`]`=1`), because it does not win yet: the
//! same conv runs at 235 direct-equivalent GFLOP/s (0.92x), its products at ~45 % of the FMA
//! peak and part of its transforms in scalar code. Correct (tested against the direct kernel
//! and an f64 reference on every level with a direct conv), so that tuning it can be measured. The transforms (Lavin & Gray, 2015):
//! `U = G g G^T` per weight 3x3 (once, at load), `V = B^T d B` per 4x4 input patch (stride 2),
//! 16 products `M_k = U_k V_k` over the channels (one matrix product per k: the hot loop, the
//! broadcast-FMA register tile of the 1x1 conv with vectors along the tiles of all images of
//! the batch), and `Y = A^T M A` per tile on the way out, with the bias. F(2x2, 3x3) rather than
//! F(4x4, 3x3) (4x fewer): its transforms have only 0, +-1 and 1/2, so the result stays within
//! a few float roundings of the direct conv (checked against it and an f64 reference), where
//! F(4x4)'s larger transform constants cost about a decimal digit.
//!
//! Work items for the pool of [`super::par`]: (image, run of tile rows) of about
//! [`CHUNK_TILES`] tiles, each transforming its patches of every input channel, multiplying
//! and transforming back into its own output rows, all in its thread's buffers. Each item
//! writes its own values in a fixed order, so results are bit-identical for any thread count.

use super::par::SyncPtr;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{KernelLevel, Simd};

/// Entries of a transformed 4x4 tile.
const K: usize = 16;

/// The transformed weights of one 3x3 conv: `[16][co / ocb][ci][ocb]`, zero-padded channels.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Weights {
    u: Vec<f32>,
    ci: usize,
    co: usize,
    ocb: usize,
}

impl Weights {
    /// Transforms OIHW 3x3 `weights` (`co x ci x 3 x 3`) for tiles of `ocb` output channels.
    pub(crate) fn new(weights: &[f32], co: usize, ci: usize, ocb: usize) -> Weights {
        let blocks = co.div_ceil(ocb);
        let mut u = vec![0f32; K * blocks * ci * ocb];
        for o in 0..co {
            for i in 0..ci {
                let g = &weights[(o * ci + i) * 9..(o * ci + i + 1) * 9];
                // G g: 4x3, then (G g) G^T: 4x4; in f64, rounded once.
                let mut gg = [[0f64; 3]; 4];
                for c in 0..3 {
                    let (a, b, d) = (g[c] as f64, g[3 + c] as f64, g[6 + c] as f64);
                    gg[0][c] = a;
                    gg[1][c] = 0.5 * (a + b + d);
                    gg[2][c] = 0.5 * (a - b + d);
                    gg[3][c] = d;
                }
                for (r, row) in gg.iter().enumerate() {
                    let t = [
                        row[0],
                        0.5 * (row[0] + row[1] + row[2]),
                        0.5 * (row[0] - row[1] + row[2]),
                        row[2],
                    ];
                    for (c, &v) in t.iter().enumerate() {
                        let k = r * 4 + c;
                        u[((k * blocks + o / ocb) * ci + i) * ocb + o % ocb] = v as f32;
                    }
                }
            }
        }
        Weights { u, ci, co, ocb }
    }
}

/// Tiles per work item, about: 3 vectors of 16 (AVX-512's register tile), so that an item's
/// transformed input (16 x ci x 48 values, 192 KB at 64 channels) and products stay in L2 while
/// every output-channel block passes over them. (Transforming the whole batch first and
/// multiplying after ran no faster than the direct conv: the 16-fold expanded buffers went
/// through L3.)
const CHUNK_TILES: usize = 48;

/// Buffers of one work item, reused between calls.
#[derive(Default)]
struct Buffers {
    /// `[16][ci][tiles]`: the transformed input patches.
    v: Vec<f32>,
    /// `[16][co rounded up to ocb][tiles]`: the products.
    m: Vec<f32>,
    /// The transforms' rows.
    rows: Vec<f32>,
}

thread_local! {
    /// Each pool thread's item buffers.
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

/// The geometry of one call.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
}

/// One work item: tile rows `rows` of image `b`.
struct Chunk<'a> {
    weights: &'a Weights,
    bias: &'a [f32],
    /// Image b's input planes, `ci x h x w`.
    x: &'a [f32],
    /// Image b's output planes, `co x h x w`.
    y: SyncPtr<f32>,
    g: Grid,
    rows: std::ops::Range<usize>,
    /// Tiles of the item rounded up to whole vectors (the row length of `v` and `m`).
    tiles: usize,
}

/// `y = conv3x3(x) + bias` (`x`: `n x ci x h x w`, `y`: `n x co x h x w`, `bias`: one value per
/// output channel, padded) at `level`. The caller checked the lengths and that the CPU runs
/// `level`, which has a direct-conv tiling (avx512 or avx2) matching `weights.ocb` and `lanes`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    level: KernelLevel,
    weights: &Weights,
    bias: &[f32],
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    y: &mut [f32],
    lanes: usize,
) {
    let Weights { ci, co, .. } = *weights;
    let g = Grid { h, w, th: h.div_ceil(2), tw: w.div_ceil(2) };
    let per_chunk = (CHUNK_TILES / g.tw).clamp(1, g.th);
    let chunks = g.th.div_ceil(per_chunk);
    let tiles = (per_chunk * g.tw).div_ceil(lanes) * lanes;
    let out = SyncPtr(y.as_mut_ptr());
    super::par::for_each(n * chunks, |item| {
        let (b, chunk) = (item / chunks, item % chunks);
        let job = Chunk {
            weights,
            bias,
            x: &x[b * ci * h * w..(b + 1) * ci * h * w],
            // SAFETY: image b's planes lie inside `y` (the caller checked its length).
            y: SyncPtr(unsafe { out.ptr().add(b * co * h * w) }),
            g,
            rows: chunk * per_chunk..((chunk + 1) * per_chunk).min(g.th),
            tiles,
        };
        BUFFERS.with_borrow_mut(|buffers| {
            // SAFETY: the caller checked that the CPU runs `level`; the item writes only its
            // own output rows (2 per tile row) of image b's planes, and its own buffers.
            unsafe {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512 => job.avx512(buffers),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx2 => job.avx2(buffers),
                    _ => unreachable!("Winograd runs at the direct conv's levels only"),
                }
            }
        });
    });
}

impl Chunk<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(&self, buffers: &mut Buffers) {
        self.run::<Avx512, 8, 3>(buffers)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, buffers: &mut Buffers) {
        self.run::<Avx2, 4, 2>(buffers)
    }

    /// Input transform of every channel, the 16 products, output transform of every channel.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it; `self.y` is valid
    /// for `co x h x w` values.
    #[inline(always)]
    unsafe fn run<S: Simd, const OCB: usize, const PV: usize>(&self, s: &mut Buffers) {
        let Weights { ci, co, ocb, .. } = *self.weights;
        let (g, tiles) = (self.g, self.tiles);
        let blocks = co.div_ceil(ocb);
        let (v_len, m_len) = (K * ci * tiles, K * blocks * ocb * tiles);
        if s.v.len() < v_len {
            s.v.resize(v_len, 0.0);
        }
        if s.m.len() < m_len {
            s.m.resize(m_len, 0.0);
        }
        let plane = g.h * g.w;
        // The tiles past the item's only feed products that are never read out; zeroing them
        // keeps every value finite.
        let used = self.rows.len() * g.tw;
        for c in 0..ci {
            let v = s.v.as_mut_ptr().add(c * tiles);
            let x = &self.x[c * plane..(c + 1) * plane];
            transform_input(x, &g, self.rows.clone(), v, ci * tiles, &mut s.rows);
            for k in 0..K {
                std::slice::from_raw_parts_mut(v.add(k * ci * tiles + used), tiles - used)
                    .fill(0.0);
            }
        }
        let product = Product {
            v: s.v.as_ptr(),
            u: self.weights.u.as_ptr(),
            m: s.m.as_mut_ptr(),
            k: 0,
            ci,
            blocks,
            tiles,
            vectors: 0..tiles / S::LANES,
        };
        for k in 0..K {
            Product { k, vectors: product.vectors.clone(), ..product }.run::<S, OCB, PV>();
        }
        for o in 0..co {
            let job = Output {
                m: s.m.as_ptr().add(o * tiles),
                k_stride: blocks * ocb * tiles,
                bias: self.bias[o],
            };
            let y = std::slice::from_raw_parts_mut(self.y.ptr().add(o * plane), plane);
            transform_output(&job, &g, self.rows.clone(), y, &mut s.rows);
        }
    }
}

/// One output channel: entry k of tile t is `m[k * k_stride + t]`.
struct Output {
    m: *const f32,
    k_stride: usize,
    bias: f32,
}

/// `V = B^T d B` for the 4x4 patches (stride 2, zero outside the plane) of tile rows `tile_rows`
/// of one channel's `plane` (`h x w`): entry k of the item's tile t goes to
/// `v[k * k_stride + t]`.
///
/// Vectorised along a tile row: with a padded row split into its even columns `E` and odd
/// columns `O`, tile j's four columns are `E[j], O[j], E[j+1], O[j+1]`, so `d B` for all tiles of
/// the row is four contiguous element-wise passes (which the compiler vectorises); `B^T` then
/// combines four such rows.
/// Safety: `v` is valid for `16 * k_stride` values past it at the item's tiles.
#[inline(always)]
unsafe fn transform_input(
    plane: &[f32],
    g: &Grid,
    tile_rows: std::ops::Range<usize>,
    v: *mut f32,
    k_stride: usize,
    rows: &mut Vec<f32>,
) {
    let (tw, h, w) = (g.tw, g.h, g.w);
    let first = tile_rows.start;
    {
        // Split straight from the plane: a padded copy read back at another alignment cost
        // store-forwarding stalls (a quarter of the transform).
        let half = tw + 1;
        rows.resize(8 * half + 16 * tw, 0.0);
        let (halves, cols) = rows.split_at_mut(8 * half);
        for ti in tile_rows {
            for r in 0..4 {
                // Patch row r of tile row ti is image row 2 ti + r - 1; even[j] is image
                // column 2 j - 1 and odd[j] column 2 j (zero outside the image).
                let (even, odd) = halves[2 * r * half..(2 * r + 2) * half].split_at_mut(half);
                let y = (2 * ti + r).checked_sub(1).filter(|&y| y < h);
                let Some(y) = y else {
                    even.fill(0.0);
                    odd.fill(0.0);
                    continue;
                };
                let row = &plane[y * w..(y + 1) * w];
                even[0] = 0.0;
                for (j, e) in even[1..=w / 2].iter_mut().enumerate() {
                    *e = row[2 * j + 1];
                }
                even[w / 2 + 1..].fill(0.0);
                let full = w.div_ceil(2);
                for (j, o) in odd[..full].iter_mut().enumerate() {
                    *o = row[2 * j];
                }
                odd[full..].fill(0.0);
            }
            // cols[r][c][j]: row r of tile j times B.
            for r in 0..4 {
                let even = &halves[2 * r * half..(2 * r + 1) * half];
                let odd = &halves[(2 * r + 1) * half..(2 * r + 2) * half];
                let out = &mut cols[4 * r * tw..4 * (r + 1) * tw];
                let (c01, c23) = out.split_at_mut(2 * tw);
                let (c0, c1) = c01.split_at_mut(tw);
                let (c2, c3) = c23.split_at_mut(tw);
                for j in 0..tw {
                    let (e0, o0, e1, o1) = (even[j], odd[j], even[j + 1], odd[j + 1]);
                    c0[j] = e0 - e1;
                    c1[j] = o0 + e1;
                    c2[j] = e1 - o0;
                    c3[j] = o0 - o1;
                }
            }
            let base = (ti - first) * tw;
            for c in 0..4 {
                let row = |r: usize| &cols[(4 * r + c) * tw..(4 * r + c + 1) * tw];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let out = |a: usize| {
                    std::slice::from_raw_parts_mut(v.add((a * 4 + c) * k_stride + base), tw)
                };
                let (v0, v1, v2, v3) = (out(0), out(1), out(2), out(3));
                for j in 0..tw {
                    v0[j] = r0[j] - r2[j];
                    v1[j] = r1[j] + r2[j];
                    v2[j] = r2[j] - r1[j];
                    v3[j] = r1[j] - r3[j];
                }
            }
        }
    }
}

/// `Y = A^T M A + bias` for tile rows `tile_rows` of one output channel (`job`); writes their
/// output rows of the `h x w` `plane`. Vectorised along a tile row like [`transform_input`];
/// the two output columns of each tile are interleaved on the way out.
/// Safety: `job.m` is valid for `16 * job.k_stride` values past it at the item's tiles.
#[inline(always)]
unsafe fn transform_output(
    job: &Output,
    g: &Grid,
    tile_rows: std::ops::Range<usize>,
    plane: &mut [f32],
    rows: &mut Vec<f32>,
) {
    let (tw, h, w) = (g.tw, g.h, g.w);
    let Output { m, k_stride, bias } = *job;
    let first = tile_rows.start;
    rows.resize(12 * tw, 0.0);
    for ti in tile_rows {
        let base = (ti - first) * tw;
        let e = |k: usize| std::slice::from_raw_parts(m.add(k * k_stride + base), tw);
        // t[r][c][j] = (A^T M)[r][c] of tile j, for r = 0, 1.
        let (t0, rest) = rows.split_at_mut(4 * tw);
        let (t1, out) = rest.split_at_mut(4 * tw);
        for c in 0..4 {
            let (m0, m1, m2, m3) = (e(c), e(4 + c), e(8 + c), e(12 + c));
            let (a, bb) = (&mut t0[c * tw..(c + 1) * tw], &mut t1[c * tw..(c + 1) * tw]);
            for j in 0..tw {
                a[j] = m0[j] + m1[j] + m2[j];
                bb[j] = m1[j] - m2[j] - m3[j];
            }
        }
        for (r, t) in [&*t0, &*t1].into_iter().enumerate() {
            let y = 2 * ti + r;
            if y >= h {
                break;
            }
            let (c0, c1, c2, c3) = (&t[..tw], &t[tw..2 * tw], &t[2 * tw..3 * tw], &t[3 * tw..]);
            let (left, right) = out.split_at_mut(2 * tw);
            for j in 0..tw {
                left[j] = c0[j] + c1[j] + c2[j] + bias;
                right[j] = c1[j] - c2[j] - c3[j] + bias;
            }
            let dst = &mut plane[y * w..(y + 1) * w];
            let (pairs, last) = dst.split_at_mut(w / 2 * 2);
            for (j, pair) in pairs.chunks_exact_mut(2).enumerate() {
                pair[0] = left[j];
                pair[1] = right[j];
            }
            if let Some(d) = last.first_mut() {
                *d = left[w / 2];
            }
        }
    }
}

/// One product item: `m[k][o][t] = sum_c u[k][o][c] v[k][c][t]` for every output channel and
/// the tile vectors `vectors`.
struct Product {
    v: *const f32,
    u: *const f32,
    m: *mut f32,
    k: usize,
    ci: usize,
    blocks: usize,
    tiles: usize,
    vectors: std::ops::Range<usize>,
}

impl Product {
    /// Every output-channel block over the item's tile vectors, `OCB x PV` accumulators.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it.
    #[inline(always)]
    unsafe fn run<S: Simd, const OCB: usize, const PV: usize>(&self) {
        for block in 0..self.blocks {
            let mut p = self.vectors.start;
            while p + PV <= self.vectors.end {
                self.tile::<S, OCB, PV>(block, p);
                p += PV;
            }
            // Fewer than PV (at most 3) vectors remain.
            match self.vectors.end - p {
                2 => self.tile::<S, OCB, 2>(block, p),
                1 => self.tile::<S, OCB, 1>(block, p),
                _ => {}
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<S: Simd, const OCB: usize, const N: usize>(&self, block: usize, first: usize) {
        let v = self.v.add(self.k * self.ci * self.tiles + first * S::LANES);
        let u = self.u.add((self.k * self.blocks + block) * self.ci * OCB);
        let mut acc = [[S::zero(); N]; OCB];
        for c in 0..self.ci {
            let vc = v.add(c * self.tiles);
            let mut xv = [S::zero(); N];
            for (p, xv) in xv.iter_mut().enumerate() {
                *xv = S::load(vc.add(p * S::LANES));
            }
            for (j, row) in acc.iter_mut().enumerate() {
                let wv = S::splat(*u.add(c * OCB + j));
                for p in 0..N {
                    row[p] = S::fma(wv, xv[p], row[p]);
                }
            }
        }
        let m = self.m.add((self.k * self.blocks + block) * OCB * self.tiles + first * S::LANES);
        for (j, row) in acc.iter().enumerate() {
            for (p, &a) in row.iter().enumerate() {
                S::store(m.add(j * self.tiles + p * S::LANES), a);
            }
        }
    }
}
