//! Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions of [`super::direct_conv`]: 16
//! multiplies per 2x2 output tile and channel pair instead of 36, 2.25x fewer.
//!
//! Why: on one core the direct conv already runs at the FMA peak (measured 255 GFLOP/s on a
//! 64-channel 32x32 conv on this Zen 5 core: 2 x 512-bit FMAs a cycle), and onnxruntime is close
//! behind, so going faster needs less arithmetic (issue 14 item 4).
//!
//! Where it runs (`Tiling::winograd` in [`super::direct_conv`], from the `probe` test below:
//! `cargo test --release --lib probe_speed -- --ignored --nocapture`): every 3x3 conv on AVX2
//! and the portable level; on AVX-512, where the direct kernel is at the FMA peak and the
//! transforms and buffers eat the gain on small convs, from 64 input channels on 32x32 planes
//! and from 128 on smaller ones.
//! `DIFFSHIELD_WINOGRAD=0` turns it off. Tested against the direct kernel and an f64 reference
//! on every level with a direct conv. The transforms (Lavin & Gray, 2015):
//! `U = G g G^T` per weight 3x3 (once, at load), `V = B^T d B` per 4x4 input patch (stride 2),
//! 16 products `M_k = U_k V_k` over the channels (one matrix product per k: the hot loop, the
//! broadcast-FMA register tile of the 1x1 conv with vectors along the tiles of all images of
//! the batch), and `Y = A^T M A` per tile on the way out, with the bias. F(2x2, 3x3) rather than
//! F(4x4, 3x3) (4x fewer): its transforms have only 0, +-1 and 1/2, so the result stays within
//! a few float roundings of the direct conv (checked against it and an f64 reference), where
//! F(4x4)'s larger transform constants cost about a decimal digit.
//!
//! Work items for the pool of [`super::par`]: runs of tile rows (spanning images) of about
//! [`CHUNK_TILES`] tiles, more and shorter where that loads the threads more evenly with whole
//! vectors (`item_count`), each transforming its patches of every input channel, multiplying
//! and transforming back into its own output rows, all in its thread's buffers. Each item
//! writes its own values in a fixed order, so results are bit-identical for any thread count.

use super::direct_conv::Tile;
use super::par::SyncPtr;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, PortableFma};
use super::simd::{KernelLevel, Portable, Simd};

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
    /// `[16][ci][tiles + a vector]`: the transformed input patches.
    v: Vec<f32>,
    /// `[16][co rounded up to ocb][tiles + a vector]`: the products.
    m: Vec<f32>,
    /// The input transform's zero-padded rows.
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

/// One work item: a run of tile rows of the batch (image after image), about [`CHUNK_TILES`]
/// tiles. An item may span images, so that small planes still fill whole tile vectors and
/// every pass over the transformed weights serves as many tiles (per image, a 16x16 plane's
/// 64 tiles would split 48 + 16, and an 8x8 plane's 16 tiles would be one vector a pass).
struct Chunk<'a> {
    weights: &'a Weights,
    bias: &'a [f32],
    /// The batch's input planes, `n x ci x h x w`.
    x: &'a [f32],
    /// The batch's output planes, `n x co x h x w`.
    y: SyncPtr<f32>,
    g: Grid,
    /// Tile rows of the batch: row r is tile row `r % th` of image `r / th`.
    rows: std::ops::Range<usize>,
    /// Tiles of the item rounded up to whole vectors (`v` and `m` rows are a vector longer).
    tiles: usize,
}

/// The part of an item in one image: its tile rows and the item's tile of the first of them.
struct Segment {
    image: usize,
    rows: std::ops::Range<usize>,
    first_tile: usize,
}

impl Chunk<'_> {
    /// The item's rows image by image, in order (the transforms' stores run past a segment's
    /// last row into the next segment's tiles, which are written after).
    fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        let th = self.g.th;
        let mut r = self.rows.start;
        std::iter::from_fn(move || {
            (r < self.rows.end).then(|| {
                let image = r / th;
                let end = ((image + 1) * th).min(self.rows.end);
                let segment = Segment {
                    image,
                    rows: r - image * th..end - image * th,
                    first_tile: (r - self.rows.start) * self.g.tw,
                };
                r = end;
                segment
            })
        })
    }
}

/// `y = conv3x3(x) + bias` (`x`: `n x ci x h x w`, `y`: `n x co x h x w`, `bias`: one value per
/// output channel, padded) at `level`. The caller checked the lengths and that the CPU runs
/// `level`, which has a direct-conv tiling (avx512, avx2, portable-fma or portable) matching
/// `weights.ocb` and `lanes`.
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
    let g = Grid { h, w, th: h.div_ceil(2), tw: w.div_ceil(2) };
    let total_rows = n * g.th;
    let chunks = item_count(total_rows, g.tw, lanes, super::par::threads());
    let per_chunk = total_rows.div_ceil(chunks);
    let chunks = total_rows.div_ceil(per_chunk);
    let tiles = (per_chunk * g.tw).div_ceil(lanes) * lanes;
    let out = SyncPtr(y.as_mut_ptr());
    super::par::for_each(chunks, |chunk| {
        let job = Chunk {
            weights,
            bias,
            x,
            y: out,
            g,
            rows: chunk * per_chunk..((chunk + 1) * per_chunk).min(total_rows),
            tiles,
        };
        BUFFERS.with_borrow_mut(|buffers| {
            // SAFETY: the caller checked that the CPU runs `level` and the lengths of `x` and
            // `y`; the item writes only its own output rows (2 per tile row of its images) and
            // its own buffers.
            unsafe {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512 => job.avx512(buffers),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx2 => job.avx2(buffers),
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::PortableFma => job.portable_fma(buffers),
                    KernelLevel::Portable => job.portable(buffers),
                    _ => unreachable!("Winograd runs at the direct conv's levels only"),
                }
            }
        });
    });
}

/// How many items `rows` tile rows of `tw` tiles split into on `threads` threads: about
/// [`CHUNK_TILES`] tiles each, the rows spread evenly over them (b1 16x16: 4 + 4 rows rather
/// than 6 + 2). Where that makes few items (the 8x8 planes), the count among those up to 4 per
/// thread that needs the fewest tile vectors per thread (each item rounds its tiles up to whole
/// vectors, and a thread runs whole items): batch-8 8x8 planes run as 4 items of 2 vectors
/// rather than 3 of 3 (11 rows of 4 tiles), and two threads evenly loaded (`probe_speed`,
/// 64 channels, one thread, median of 3 runs: Zen 4 AVX-512 478 -> 453 us; Zen 3 AVX2 311 ->
/// 279 us, portable 850 -> 758 us). Which item a tile falls in does not change its
/// values (each lane of a tile vector is one tile's sums, in channel order), so the bits do
/// not depend on the count.
fn item_count(rows: usize, tw: usize, lanes: usize, threads: usize) -> usize {
    let natural = rows.div_ceil((CHUNK_TILES / tw).clamp(1, rows));
    let cost = |items: usize| {
        let per = rows.div_ceil(items);
        let items = rows.div_ceil(per);
        (items.div_ceil(threads) * (per * tw).div_ceil(lanes), items)
    };
    (natural..=(4 * threads).clamp(natural, rows)).min_by_key(|&c| cost(c)).unwrap_or(natural)
}

impl Chunk<'_> {
    /// [`Chunk::run`] on AVX-512's tile: 8 output channels x 3 tile vectors.
    /// Safety: the CPU supports AVX-512F; `self` as [`conv`] builds it at the avx512 level
    /// (`weights.ocb` 8, tiles in whole vectors of 16).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(&self, buffers: &mut Buffers) {
        self.run::<Avx512, 8, 3>(buffers)
    }

    /// [`Chunk::run`] on AVX2's tile: 4 output channels x 2 tile vectors.
    /// Safety: the CPU supports AVX2 and FMA; `self` as [`conv`] builds it at the avx2 level
    /// (`weights.ocb` 4, tiles in whole vectors of 8).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, buffers: &mut Buffers) {
        self.run::<Avx2, 4, 2>(buffers)
    }

    /// The direct conv's portable tile (no instruction-set requirement).
    /// Safety: `self` as [`conv`] builds it at the portable level (`weights.ocb` the direct
    /// conv's `PORTABLE_OCB`, tiles in whole vectors of 8).
    unsafe fn portable(&self, buffers: &mut Buffers) {
        self.run::<Portable, { super::direct_conv::PORTABLE_OCB }, 2>(buffers)
    }

    /// [`Chunk::run`] on [`PortableFma`] vectors, compiled for AVX2 + FMA (the direct conv's
    /// portable-fma tile).
    /// Safety: the CPU supports AVX2 and FMA; `self` as [`conv`] builds it at the portable-fma
    /// level (`weights.ocb` the direct conv's `PORTABLE_FMA_OCB`, tiles in whole vectors of 8).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn portable_fma(&self, buffers: &mut Buffers) {
        self.run::<PortableFma, { super::direct_conv::PORTABLE_FMA_OCB }, 2>(buffers)
    }

    /// Input transform of every channel, the 16 products, output transform of every channel.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it; `self.x` and
    /// `self.y` hold the batch's `n x ci` and `n x co` planes of `h x w` values.
    #[inline(always)]
    unsafe fn run<S: Simd, const OCB: usize, const PV: usize>(&self, s: &mut Buffers) {
        let Weights { ci, co, ocb, .. } = *self.weights;
        let (g, tiles) = (self.g, self.tiles);
        // Rows of v and m are a vector longer than the tiles: the transforms' slack.
        let stride = tiles + S::LANES;
        let blocks = co.div_ceil(ocb);
        let (v_len, m_len) = (K * ci * stride, K * blocks * ocb * stride);
        if s.v.len() < v_len {
            s.v.resize(v_len, 0.0);
        }
        if s.m.len() < m_len {
            s.m.resize(m_len, 0.0);
        }
        let plane = g.h * g.w;
        // The tiles past the item's (up to a vector, and the slack) hold whatever the buffers
        // held: they only feed products that are never read out.
        for c in 0..ci {
            for seg in self.segments() {
                let v = s.v.as_mut_ptr().add(c * stride + seg.first_tile);
                let x = &self.x[(seg.image * ci + c) * plane..][..plane];
                transform_input::<S>(x, &g, seg.rows, v, ci * stride, &mut s.rows);
            }
        }
        let product = Product {
            v: s.v.as_ptr(),
            u: self.weights.u.as_ptr(),
            m: s.m.as_mut_ptr(),
            ci,
            blocks,
            stride,
            vectors: tiles / S::LANES,
        };
        for k in 0..K {
            product.run::<S, OCB, PV>(k);
        }
        for o in 0..co {
            for seg in self.segments() {
                let m = s.m.as_ptr().add(o * stride + seg.first_tile);
                let job = Output { m, k_stride: blocks * ocb * stride, bias: self.bias[o] };
                let y = self.y.ptr().add((seg.image * co + o) * plane);
                transform_output::<S>(&job, &g, seg.rows, y);
            }
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
/// Vectorised along a tile row: the rows the patches cover are first copied with a zero column
/// on each side; then for a vector of tiles j, the even and odd lanes of the loads at padded
/// columns 2 j and 2 j + 2 are the patches' four columns (`E[j], O[j], E[j+1], O[j+1]`), so
/// `d B` and `B^T` are 32 vector adds in registers. (Splitting each row into even and odd
/// arrays first and reading them back one lane apart stalled on store forwarding: a quarter of
/// the transform.) Stores run up to a vector past a tile row: into the next row's tiles
/// (written after) or the row's slack.
/// Safety: runs inside a function compiled for `S` on a CPU that has it; `v` is valid for
/// `16 * k_stride` values past it at the item's tiles plus a vector.
#[inline(always)]
unsafe fn transform_input<S: Simd>(
    plane: &[f32],
    g: &Grid,
    tile_rows: std::ops::Range<usize>,
    v: *mut f32,
    k_stride: usize,
    rows: &mut Vec<f32>,
) {
    let (tw, h, w) = (g.tw, g.h, g.w);
    let first = tile_rows.start;
    let lanes = S::LANES;
    // Padded row: column C is image column C - 1. Only columns 0..=2 tw + 1 must be right;
    // the loads of the last vector reach 2 lanes further, which only make tiles past the row.
    let pw = 2 * tw + 2 * lanes + 2;
    let count = 2 * tile_rows.len() + 2;
    // Grown only: every value read is written below, and a shrink then regrow between the
    // item's segments would zero the difference again (a `memset` call each time).
    if rows.len() < count * pw {
        rows.resize(count * pw, 0.0);
    }
    for i in 0..count {
        let dst = &mut rows[i * pw..(i + 1) * pw];
        match (2 * first + i).checked_sub(1).filter(|&y| y < h) {
            Some(y) => {
                dst[0] = 0.0;
                copy_row::<S>(&plane[y * w..(y + 1) * w], &mut dst[1..=w]);
                // Image columns w and (odd w) w + 1 are outside the image.
                dst[w + 1] = 0.0;
                dst[w + 2] = 0.0;
            }
            // Whole vectors of zeroes up to 2 tw + 2 rounded up, inside the row (pw is a
            // vector longer): `fill` is a `memset` call.
            None => {
                for at in (0..2 * tw + 2).step_by(lanes) {
                    S::store(dst.as_mut_ptr().add(at), S::zero());
                }
            }
        }
    }
    let padded = rows.as_ptr();
    for ti in tile_rows {
        let top = padded.add(2 * (ti - first) * pw);
        let base = v.add((ti - first) * tw);
        for j in (0..tw).step_by(lanes) {
            let mut col = [[S::zero(); 4]; 4];
            for (r, col) in col.iter_mut().enumerate() {
                let p = top.add(r * pw + 2 * j);
                let (e0, o0) = S::deinterleave(S::load(p), S::load(p.add(lanes)));
                let (e1, o1) = S::deinterleave(S::load(p.add(2)), S::load(p.add(2 + lanes)));
                *col = [S::sub(e0, e1), S::add(o0, e1), S::sub(e1, o0), S::sub(o0, o1)];
            }
            // c picks a column across the four rows.
            #[allow(clippy::needless_range_loop)]
            for c in 0..4 {
                let out = [
                    S::sub(col[0][c], col[2][c]),
                    S::add(col[1][c], col[2][c]),
                    S::sub(col[2][c], col[1][c]),
                    S::sub(col[1][c], col[3][c]),
                ];
                for (a, &val) in out.iter().enumerate() {
                    S::store(base.add((a * 4 + c) * k_stride + j), val);
                }
            }
        }
    }
}

/// `dst = src` (the same length) a vector at a time. (`copy_from_slice` calls `memcpy`, whose
/// call costs more than these rows of 8 to 32 values take to copy.)
/// Safety: runs inside a function compiled for `S` on a CPU that has it.
#[inline(always)]
unsafe fn copy_row<S: Simd>(src: &[f32], dst: &mut [f32]) {
    let len = src.len().min(dst.len());
    let (from, to) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= len {
        S::store(to.add(i), S::load(from.add(i)));
        i += S::LANES;
    }
    if i < len {
        S::store_first(to.add(i), S::load_first(from.add(i), len - i), len - i);
    }
}

/// `Y = A^T M A + bias` for tile rows `tile_rows` of one output channel (`job`); writes their
/// output rows of the `h x w` `plane`. A vector of tiles at a time in registers; the two output
/// columns of each tile are interleaved on the way out. Reads run up to a vector past a tile
/// row (into the row's slack; those lanes are dropped).
/// Safety: as [`transform_input`]; `job.m` is valid for `16 * job.k_stride` values past it at
/// the item's tiles plus a vector; `plane` is valid for `h x w` values, and no other thread
/// touches the rows written here (a raw pointer: other items write the plane's other rows at
/// the same time, so a `&mut` slice of the whole plane would alias theirs).
#[inline(always)]
unsafe fn transform_output<S: Simd>(
    job: &Output,
    g: &Grid,
    tile_rows: std::ops::Range<usize>,
    plane: *mut f32,
) {
    let (tw, h, w) = (g.tw, g.h, g.w);
    let Output { m, k_stride, bias } = *job;
    let first = tile_rows.start;
    let bias = S::splat(bias);
    let lanes = S::LANES;
    for ti in tile_rows {
        let base = m.add((ti - first) * tw);
        for j in (0..tw).step_by(lanes) {
            let e = |k: usize| S::load(base.add(k * k_stride + j));
            let mut t = [[S::zero(); 4]; 2];
            // c picks a column across the rows of M and both rows of t.
            #[allow(clippy::needless_range_loop)]
            for c in 0..4 {
                let (m1, m2) = (e(4 + c), e(8 + c));
                t[0][c] = S::add(S::add(e(c), m1), m2);
                t[1][c] = S::sub(S::sub(m1, m2), e(12 + c));
            }
            for (r, t) in t.iter().enumerate() {
                let y = 2 * ti + r;
                if y >= h {
                    break;
                }
                let left = S::add(S::add(S::add(t[0], t[1]), t[2]), bias);
                let right = S::add(S::sub(S::sub(t[1], t[2]), t[3]), bias);
                let (lo, hi) = S::interleave(left, right);
                let (x0, dst) = (2 * j, plane.add(y * w));
                if x0 + 2 * lanes <= w {
                    S::store(dst.add(x0), lo);
                    S::store(dst.add(x0 + lanes), hi);
                } else if x0 + lanes <= w {
                    S::store(dst.add(x0), lo);
                    S::store_first(dst.add(x0 + lanes), hi, w - x0 - lanes);
                } else {
                    S::store_first(dst.add(x0), lo, w - x0);
                }
            }
        }
    }
}

/// The 16 products of one item: `m[k][o][t] = sum_c u[k][o][c] v[k][c][t]` for every output
/// channel `o` and the item's tile vectors.
struct Product {
    v: *const f32,
    u: *const f32,
    m: *mut f32,
    ci: usize,
    blocks: usize,
    /// Row length of `v` and `m` (the item's tiles and the slack).
    stride: usize,
    /// Tile vectors of the item.
    vectors: usize,
}

impl Product {
    /// Product `k`: every output-channel block over the item's tile vectors, `OCB x PV`
    /// accumulators.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it.
    #[inline(always)]
    unsafe fn run<S: Simd, const OCB: usize, const PV: usize>(&self, k: usize) {
        for block in 0..self.blocks {
            let mut p = 0;
            while p + PV <= self.vectors {
                self.tile::<S, OCB, PV>(k, block, p);
                p += PV;
            }
            // Fewer than PV (at most 3) vectors remain.
            match self.vectors - p {
                2 => self.tile::<S, OCB, 2>(k, block, p),
                1 => self.tile::<S, OCB, 1>(k, block, p),
                _ => {}
            }
        }
    }

    /// Tile vectors `first .. first + N` of output-channel block `block` of product `k`: the
    /// direct conv's 1x1 register tile, with the sums starting from zero (the bias is added on
    /// the way out).
    /// Safety: as [`Product::run`]; `OCB` is the weights' `ocb`, `block < self.blocks`,
    /// `first + N <= self.vectors`, and `self`'s pointers are the item's buffers as
    /// [`Chunk::run`] sizes them.
    #[inline(always)]
    unsafe fn tile<S: Simd, const OCB: usize, const N: usize>(
        &self,
        k: usize,
        block: usize,
        first: usize,
    ) {
        /// The zero starting sums (OCB is at most 8).
        const ZEROS: [f32; 8] = [0.0; 8];
        const { assert!(OCB <= ZEROS.len()) };
        let tile = Tile {
            x: self.v.add(k * self.ci * self.stride),
            plane: self.stride,
            wp: 0,
            ci: self.ci,
            w: self.u.add((k * self.blocks + block) * self.ci * OCB),
            bias: ZEROS.as_ptr(),
            out: self.m.add((k * self.blocks + block) * OCB * self.stride),
            out_stride: self.stride,
            channels: OCB,
        };
        let at: [usize; N] = std::array::from_fn(|p| (first + p) * S::LANES);
        tile.run::<S, OCB, N, 1>([0], at, at)
    }
}

/// Direct against Winograd on single convs, one thread, both levels (a timing, so ignored;
/// run it with `--ignored --nocapture` to re-derive `Tiling::winograd`).
#[cfg(test)]
mod probe {
    use crate::backend::conv_kernel::ConvKernel;
    use crate::backend::direct_conv::DirectConv;
    use crate::backend::simd::KernelLevel;
    #[test]
    #[ignore]
    fn probe_speed() {
        for &(n, ci, co, h) in &[
            (1usize, 32usize, 32usize, 32usize),
            (8, 32, 32, 32),
            (1, 64, 64, 32),
            (8, 64, 64, 32),
            (1, 64, 64, 16),
            (8, 64, 64, 16),
            (1, 128, 128, 16),
            (8, 128, 128, 16),
            (1, 96, 64, 32),
            (8, 192, 128, 16),
            (1, 128, 128, 8),
            (8, 128, 128, 8),
            (8, 64, 64, 8),
        ] {
            let x = crate::backend::test_values::values(n * ci * h * h, 1);
            let w = crate::backend::test_values::values(co * ci * 9, 2);
            for level in KernelLevel::ALL.into_iter().filter(|&l| DirectConv::available(l)) {
                let direct =
                    DirectConv::new(&w, &[0.0], co, ci, 3, level).unwrap().with_winograd(&w, false);
                let wg = direct.clone().with_winograd(&w, true);
                let mut y = vec![0f32; n * co * h * h];
                let mut t = [0.0; 2];
                for (i, conv) in [&direct, &wg].into_iter().enumerate() {
                    conv.run(&x, n, h, h, None, &mut y).unwrap();
                    let reps = 400 / n;
                    let s = std::time::Instant::now();
                    for _ in 0..reps {
                        conv.run(&x, n, h, h, None, &mut y).unwrap();
                    }
                    t[i] = s.elapsed().as_secs_f64() / reps as f64 * 1e6;
                }
                eprintln!("{level:?} n{n} {ci}->{co} {h}x{h}: direct {:.0} us, winograd {:.0} us, speedup {:.2}", t[0], t[1], t[0] / t[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::item_count;

    #[test]
    fn small_planes_split_into_whole_vectors_and_large_ones_keep_their_chunks() {
        // Batch-8 8x8 planes: 32 tile rows of 4 tiles; 4 items of 2 vectors (16 lanes) or 4
        // (8 lanes) rather than 3 items of 11 rows, on one thread and on two.
        for threads in [1, 2] {
            assert_eq!(item_count(32, 4, 16, threads), 4, "{threads} threads");
            assert_eq!(item_count(32, 4, 8, threads), 4, "{threads} threads");
        }
        // One 8x8 plane is one vector of 16 tiles: halves would still be a vector each.
        assert_eq!(item_count(4, 4, 16, 2), 1);
        // With 8 lanes the halves are a vector each, one per thread.
        assert_eq!(item_count(4, 4, 8, 2), 2);
        // Batch-8 32x32 planes make 43 items of 3 rows either way.
        assert_eq!(item_count(128, 16, 16, 1), 43);
        assert_eq!(item_count(128, 16, 16, 2), 43);
        // Never more items than rows.
        assert_eq!(item_count(1, 1, 16, 8), 1);
    }
}
