//! Exact integer Winograd F(4x4, 3x3) for the 3x3 int8 convs of [`super::quant_conv`]: the
//! same integer sums as the direct kernel, so the same output bits, from half the
//! multiply-add instructions.
//!
//! Why: the direct int8 conv runs at 88-99 % of one `vpdpbusd` (64 u8 x s8 products) per
//! cycle, so only fewer instructions make it faster. Winograd's transformed operands do not
//! fit u8 x s8, but they fit i16: with the weight transform's rows scaled to integers
//! (`D1 G`, entries 0, +-1, +-2, 4), a transformed weight is at most 49 x 127 = 6223 and a
//! transformed input patch of u8 values at most 10 x 10 x 255 = 25500 (20400 in fact). One
//! `vpdpwssd` (32 i16 x i16 products, the same instruction rate as `vpdpbusd` on Zen 4:
//! `examples/dot_rates`) then does for 36 products what took 144 / 64: 0.5x the instructions
//! for the products, plus the transforms.
//!
//! Exactness: every step is integer arithmetic modulo 2^32 (i32 lanes wrap), and the output
//! transform is `A_e^T M A_e` with `A_e = diag(6, 4, 4, 1, 1, 24) A`, which gives 576 times the
//! conv's sum `S` (the scaling `D1` undone by integers). 576 = 64 x 9: multiplying by 9's
//! inverse modulo 2^32 gives `64 S` modulo 2^32, which is `64 S` itself when `|S| < 2^25`,
//! and an arithmetic shift gives `S`. `S` is a sum of u8 x s8 products, so
//! `|S| <= 255 x sum |w|` per output channel: [`Weights::new`] refuses a conv where that bound
//! reaches 2^25 (the direct kernel then runs it; denoiser_m's largest bound is 0.78 of it).
//! The input is padded with its zero point on all four sides, so `S` is the direct kernel's
//! interior sum; at the first and last column the direct kernel's masked taps leave the zero
//! point's share of the left (right) weights out, and so does this one (an integer
//! subtraction) before the same dequantization with the same per-column offsets: the same f32
//! operations on the same integers, the same bits (tested against the direct kernel).
//!
//! Layout. The input is quantized into blocks of 32 channels: per image and block, the padded
//! plane's pixels, each one vector of 32 i16 in channel order (word `k` holds channels `2k`
//! and `2k + 1`, the pair its weights are packed for). Work items are runs of 4x4 output tiles
//! over the whole batch; each transforms its tiles' 6x6 patches (lanes along channels) into
//! `V[36][ci / 32][tiles][16]` words, multiplies per entry against `U[co / 32][36][ci / 2][32]`
//! (12 tiles x 32 output channels of i32 accumulators, the tile's words broadcast), and
//! transforms each tile back (lanes along output channels), dequantizes, transposes and stores
//! a row of up to four tiles side by side (16 pixels) per channel at a time. Each item writes
//! only its own tiles' pixels in a fixed order, so any thread count gives the same bits.

// The kernel is x86-64 only; elsewhere its types are type-checked but never run.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
// The transforms fill 6x6 (and 4x6) arrays of vectors column by column and read them row by
// row: index loops say that more plainly than iterators over one of the two axes.
#![allow(clippy::needless_range_loop)]

/// Entries of a transformed 6x6 patch.
const P: usize = 36;
/// Input channels per block (one vector of i16 per pixel).
const CB: usize = 32;
/// Output channels per product tile (two vectors of i32).
const OB: usize = 32;
/// Tiles per product tile.
const NT: usize = 12;
/// Lanes of one vector of i32 / f32.
const LANES: usize = 16;
/// 9's inverse modulo 2^32 (9 x 954437177 = 2 x 2^32 + 1).
const INV9: i32 = 954_437_177;
/// A sum must stay below this in magnitude to be recovered exactly (see the module doc).
const LIMIT: i64 = 1 << 25;
/// Bytes of transformed input an item keeps (its tiles' `V`, in L2 with `M` beside it).
const ITEM_V_BYTES: usize = 512 * 1024;
/// The most tiles one item takes (more only lengthens the last item's tail).
const MAX_ITEM_TILES: usize = 64;
/// Input channels from which [`super::quant_conv`] picks this kernel. With 64 the transforms
/// weigh twice as much per product as with 128; it ran at 0.8-1.05x the direct kernel until
/// `V` and `M` got their cache line of slack, and at 1.2x (64 -> 64 on 32x32) and 1.45x
/// (64 -> 128 on 16x16) since (`quant_conv::rates`, Zen 4, one thread, batch 8); whole
/// denoiser_m calls then ran 2.5-4.6 % faster with it, denoiser_s ones (mostly 64 channels on
/// 8x8 and 16x16 planes) the same. 32 input channels (denoiser_s's 32x32 planes) were not
/// measured: the direct kernel keeps them.
pub(crate) const MIN_CI: usize = 64;
/// Tiles per thread below which the direct kernel runs a conv instead: each item streams all
/// of `U` (8x the direct kernel's weights: 36 i16 per 9 s8) for its tiles, so with a few
/// tiles an item waited on memory (batch-1 denoiser_m at two threads: its 8x8 planes are 4
/// tiles, its 16x16 ones 16; the int8 convs took 5.8-6.7 ms per call against 4.7-4.9 on the
/// direct kernel), and a product tile is 12 tiles.
const MIN_THREAD_TILES: usize = 12;
/// The weight transform with its rows scaled to integers: `D1 G`, `D1 = diag(4, 6, 6, 24, 24,
/// 1)`, for F(4x4, 3x3)'s `G` (Lavin & Gray, 2015).
const DG: [[i32; 3]; 6] = [[1, 0, 0], [-1, -1, -1], [-1, 1, -1], [1, 2, 4], [1, -2, 4], [0, 0, 1]];

/// A 3x3 int8 conv's weights transformed and packed for this kernel, with what its store needs
/// to give the direct kernel's bits.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Weights {
    ci: usize,
    co: usize,
    /// `[co / OB][P][ci / 2][OB]` words: two i16 of `U = (D1 G) g (D1 G)^T`, for the channel
    /// pair of the input's word (channels `2k`, `2k + 1` of a block). Shared by clones: tract
    /// clones ops while it optimises a model, and each copy of 41 MB (the int8 denoiser_m's)
    /// raised the peak memory.
    u: std::sync::Arc<Vec<i32>>,
    /// Per output channel: the f32 per unit of the sum.
    multiplier: Vec<f32>,
    /// Per output channel, the direct kernel's offsets: interior, first column, last column.
    offset: [Vec<f32>; 3],
    /// Per output channel, zero point x the left (right) column's weights: what the direct
    /// kernel's masked taps leave out of a first (last) column's sum.
    missing: [Vec<i32>; 2],
}

impl Weights {
    /// Transforms `weights` (OIHW s8, `co x ci x 3 x 3`) for input zero point `zero`, with the
    /// direct kernel's `multiplier` and `offset` per output channel ([`super::quant_conv`]).
    /// None where this kernel does not take the conv: channels not multiples of 32, or an
    /// output channel whose sum could reach 2^25 in magnitude (not recovered exactly).
    pub(crate) fn new(
        weights: &[i8],
        (co, ci): (usize, usize),
        zero: u8,
        multiplier: &[f32],
        offset: &[[f32; 4]],
    ) -> Option<Self> {
        if co == 0
            || ci == 0
            || ci % CB != 0
            || co % OB != 0
            || weights.len() != co * ci * 9
            || multiplier.len() < co
            || offset.len() < co
        {
            return None;
        }
        let kernel = |o: usize| &weights[o * ci * 9..(o + 1) * ci * 9];
        if (0..co).any(|o| 255 * kernel(o).iter().map(|&w| (w as i64).abs()).sum::<i64>() >= LIMIT)
        {
            return None;
        }
        // The transformed weights `[P][ci][co]` first (36 sequential write streams), then
        // packed in the kernel's order reading whole runs of output channels: written straight
        // into the packed order, every value was a read-modify-write far from the last one,
        // and loading denoiser_m took 0.4 s longer.
        let mut transformed = vec![0i16; P * ci * co];
        let mut missing = [vec![0i32; co], vec![0i32; co]];
        for o in 0..co {
            let (mut left, mut right) = (0i32, 0i32);
            for i in 0..ci {
                let g = &kernel(o)[i * 9..i * 9 + 9];
                left += g[0] as i32 + g[3] as i32 + g[6] as i32;
                right += g[2] as i32 + g[5] as i32 + g[8] as i32;
                // `(D1 G) g` first, then `(D1 G)^T` on its right: 162 products, not 324.
                let mut left_product = [[0i32; 3]; 6];
                for (a, da) in DG.iter().enumerate() {
                    for l in 0..3 {
                        left_product[a][l] = (0..3).map(|k| da[k] * g[k * 3 + l] as i32).sum();
                    }
                }
                for (a, row) in left_product.iter().enumerate() {
                    for (b, db) in DG.iter().enumerate() {
                        let value: i32 = (0..3).map(|l| row[l] * db[l]).sum();
                        // At most 49 x 127 in magnitude: an exact i16.
                        transformed[((a * 6 + b) * ci + i) * co + o] = value as i16;
                    }
                }
            }
            missing[0][o] = zero as i32 * left;
            missing[1][o] = zero as i32 * right;
        }
        let words = ci / 2;
        let mut u = Vec::with_capacity(co / OB * P * words * OB);
        for ob in 0..co / OB {
            for p in 0..P {
                for word in 0..words {
                    // Word k holds channels 2k and 2k + 1 (the quantizer's order).
                    let low = (p * ci + 2 * word) * co + ob * OB;
                    let high = low + co;
                    u.extend((0..OB).map(|lane| {
                        let (l, h) = (transformed[low + lane], transformed[high + lane]);
                        ((l as u16 as u32) | ((h as u16 as u32) << 16)) as i32
                    }));
                }
            }
        }
        let u = std::sync::Arc::new(u);
        let offset = [0, 1, 2].map(|kind| offset[..co].iter().map(|o| o[kind]).collect());
        Some(Weights { ci, co, u, multiplier: multiplier[..co].to_vec(), offset, missing })
    }

    /// True when this kernel runs `n` planes of `h x w` on `threads` threads: whole 4x4 tiles,
    /// and at least [`MIN_THREAD_TILES`] of them per thread.
    pub(crate) fn takes(n: usize, (h, w): (usize, usize), threads: usize) -> bool {
        h.is_multiple_of(4)
            && w.is_multiple_of(4)
            && n * (h / 4) * (w / 4) >= MIN_THREAD_TILES * threads.max(1)
    }

    /// True when this CPU runs the kernel (AVX-512F, BW and VNNI, detected at run time).
    pub(crate) fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

thread_local! {
    /// The quantized input of the conv this thread runs: `[n][ci / CB][(h + 2) (w + 2)][16]`
    /// words, kept between calls.
    static QUANTIZED: std::cell::RefCell<Vec<i32>> = std::cell::RefCell::default();
    /// The item this thread runs: its transformed patches `[P][ci / CB][tiles][16]` and its
    /// products for one output block `[P][tiles][OB]` (each run of tiles one cache line
    /// longer: see `Run::item`). Apart from [`QUANTIZED`]: the calling thread runs items too
    /// while it holds that.
    static ITEM: std::cell::RefCell<(Vec<i32>, Vec<i32>)> = std::cell::RefCell::default();
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::*;
    use crate::backend::conv_kernel::Addend;
    use crate::backend::par::{self, SyncPtr};
    use std::arch::x86_64::*;

    /// Where one conv's buffers are, shared by its items.
    struct Run<'a> {
        wt: &'a Weights,
        h: usize,
        w: usize,
        quantized: SyncPtr<i32>,
        addend: Option<Addend<'a>>,
        out: SyncPtr<f32>,
        /// Tiles side by side that are stored together (4, 2 or 1: what divides a tile row).
        group: usize,
    }

    impl Weights {
        /// Convolves `x` (`n x ci x h x w`) into `y` (`n x co x h x w`), the input quantized
        /// with `inv_scale` and the zero point the weights were packed for, adding `addend`.
        /// Safety: [`Weights::supported`] holds, `h` and `w` are multiples of 4, the slices
        /// have those lengths and `addend` as many values as its kind needs. (Few tiles are
        /// slow, not unsound: [`Weights::takes`] is the caller's choice of kernel.)
        pub(crate) unsafe fn run(
            &self,
            x: &[f32],
            n: usize,
            (h, w): (usize, usize),
            (inv_scale, zero): (f32, u8),
            addend: Option<Addend<'_>>,
            y: &mut [f32],
        ) {
            let blocks = self.ci / CB;
            let pixels = (h + 2) * (w + 2);
            let len = n * blocks * pixels * LANES;
            QUANTIZED.with(|quantized| {
                let mut quantized = quantized.borrow_mut();
                if quantized.len() < len {
                    quantized.resize(len, 0);
                }
                let q = SyncPtr(quantized.as_mut_ptr());
                par::for_each(n * blocks, |item| {
                    // SAFETY: item (image, block) writes only its own plane of the buffer
                    // sized above; the caller checked the CPU and the input's length.
                    unsafe {
                        let dst = q.ptr().add(item * pixels * LANES);
                        quantize_block(x, item, (self.ci, h, w), (inv_scale, zero), dst)
                    }
                });
                let run = Run {
                    wt: self,
                    h,
                    w,
                    quantized: SyncPtr::of(quantized.as_ptr()),
                    addend,
                    out: SyncPtr(y.as_mut_ptr()),
                    group: [4, 2, 1].into_iter().find(|g| (w / 4) % g == 0).unwrap_or(1),
                };
                // Items take whole groups, so that a group never straddles two items.
                let units = n * (h / 4) * (w / 4) / run.group;
                let cap_tiles = (ITEM_V_BYTES / (P * self.ci * 2)).clamp(1, MAX_ITEM_TILES);
                let cap = (cap_tiles / run.group).max(1);
                let threads = par::threads();
                let items = (units.div_ceil(cap).div_ceil(threads) * threads).min(units);
                par::for_each(items, |item| {
                    let (first, end) = (item * units / items, (item + 1) * units / items);
                    let (first, end) = (first * run.group, end * run.group);
                    ITEM.with(|buffers| {
                        let (v, m) = &mut *buffers.borrow_mut();
                        // SAFETY: as `run`'s; the item writes only tiles first..end.
                        unsafe { run.item(first..end, v, m) }
                    })
                });
            });
        }
    }

    /// Quantizes block `item % blocks` of image `item / blocks` of `x` (`ci x h x w` each) into
    /// `dst`: the padded plane (zero point on all four sides), 16 words per pixel.
    /// Safety: AVX-512F and BW; `dst` holds `(h + 2) (w + 2) 16` words; `h w` is a multiple of
    /// 16 and `x` holds the image.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn quantize_block(
        x: &[f32],
        item: usize,
        (ci, h, w): (usize, usize, usize),
        (inv_scale, zero): (f32, u8),
        dst: *mut i32,
    ) {
        let blocks = ci / CB;
        let (b, block) = (item / blocks, item % blocks);
        let (hw, pw) = (h * w, w + 2);
        let image = x.as_ptr().add((b * ci + block * CB) * hw);
        let zero_pixel = _mm512_set1_epi16(zero as i16);
        for p in 0..pw {
            _mm512_storeu_si512(dst.add(p * LANES).cast(), zero_pixel);
            _mm512_storeu_si512(dst.add(((h + 1) * pw + p) * LANES).cast(), zero_pixel);
        }
        for r in 1..=h {
            _mm512_storeu_si512(dst.add(r * pw * LANES).cast(), zero_pixel);
            _mm512_storeu_si512(dst.add((r * pw + w + 1) * LANES).cast(), zero_pixel);
        }
        let quant = super::super::quant_conv::Quantizer::new(inv_scale, zero);
        // Outside the loop: zeroed inside, it was a `memset` call per 16 pixels.
        let mut words = [_mm512_setzero_si512(); LANES];
        let mut i = 0;
        while i < hw {
            // Word k of 16 pixels: channel 2k's u8 in its low half, 2k + 1's in its high half
            // (the quantizer's lanes are 0-255, so the halves never overlap): one transpose of
            // words where i32 lanes took two and a pack.
            for (k, word) in words.iter_mut().enumerate() {
                let low = quant.lanes(_mm512_loadu_ps(image.add(2 * k * hw + i)));
                let high = quant.lanes(_mm512_loadu_ps(image.add((2 * k + 1) * hw + i)));
                *word = _mm512_or_si512(low, _mm512_slli_epi32::<16>(high));
            }
            transpose(&mut words);
            // Row and column stepped, not divided per pixel (a `div` each was 2 % of this).
            let (mut r, mut c) = (i / w, i % w);
            for word in &words {
                _mm512_storeu_si512(dst.add(((r + 1) * pw + c + 1) * LANES).cast(), *word);
                c += 1;
                if c == w {
                    (r, c) = (r + 1, 0);
                }
            }
            i += LANES;
        }
    }

    /// Transposes 16 vectors of 16 32-bit lanes: lane `j` of row `i` goes to lane `i` of row `j`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose(r: &mut [__m512i; LANES]) {
        let mut t = [_mm512_setzero_si512(); LANES];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
        }
        for k in 0..4 {
            let (a, b) = (4 * k, 4 * k + 2);
            r[4 * k] = _mm512_unpacklo_epi64(t[a], t[b]);
            r[4 * k + 1] = _mm512_unpackhi_epi64(t[a], t[b]);
            r[4 * k + 2] = _mm512_unpacklo_epi64(t[a + 1], t[b + 1]);
            r[4 * k + 3] = _mm512_unpackhi_epi64(t[a + 1], t[b + 1]);
        }
        // Rows 4k..4k+3 now hold, per 128-bit lane L, columns 4L..4L+3 of input rows 4k..4k+3.
        for k in 0..2 {
            for j in 0..4 {
                let (a, b) = (8 * k + j, 8 * k + 4 + j);
                t[8 * k + j] = _mm512_shuffle_i32x4::<0x88>(r[a], r[b]);
                t[8 * k + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(r[a], r[b]);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[j + 8]);
            r[j + 8] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[j + 8]);
        }
    }

    /// `B^T d` for six i16 vectors (F(4x4, 3x3)'s input transform along one axis).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn input_transform(d: [__m512i; 6]) -> [__m512i; 6] {
        // Plain functions, not closures: a closure does not inherit the target features, and
        // its intrinsics then became calls.
        use _mm512_add_epi16 as add;
        use _mm512_slli_epi16 as shl;
        use _mm512_sub_epi16 as sub;
        let a = sub(d[4], shl::<2>(d[2]));
        let b = sub(shl::<2>(d[1]), d[3]);
        let c = sub(d[4], d[2]);
        let e = sub(d[1], d[3]);
        let e2 = add(e, e);
        [
            add(sub(shl::<2>(sub(d[0], d[2])), d[2]), d[4]),
            sub(a, b),
            add(a, b),
            sub(c, e2),
            add(c, e2),
            add(sub(shl::<2>(e), d[3]), d[5]),
        ]
    }

    /// `A^T diag(6, 4, 4, 1, 1, 24) m` for six i32 vectors (the output transform along one
    /// axis, with the weight scaling undone by integers; wrapping).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_transform(m: [__m512i; 6]) -> [__m512i; 4] {
        use _mm512_add_epi32 as add;
        use _mm512_slli_epi32 as shl;
        use _mm512_sub_epi32 as sub;
        let p = add(m[1], m[2]);
        let q = sub(m[1], m[2]);
        let r = add(m[3], m[4]);
        let s = sub(m[3], m[4]);
        let six0 = add(shl::<2>(m[0]), shl::<1>(m[0]));
        let six5 = add(shl::<2>(m[5]), shl::<1>(m[5]));
        [
            add(add(six0, shl::<2>(p)), r),
            shl::<1>(add(shl::<1>(q), s)),
            shl::<2>(add(p, r)),
            shl::<2>(add(add(q, shl::<1>(s)), six5)),
        ]
    }

    /// The sums of one product tile: `N` tiles' words `v` (per input block, `N` tiles of 16
    /// words, blocks `block_stride` words apart) against the output block's weights `u` (32
    /// per word), into `m` (32 i32 per tile).
    /// Safety: AVX-512F and VNNI; the pointers hold those values.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn products<const N: usize>(
        v: *const i32,
        (blocks, block_stride): (usize, usize),
        u: *const i32,
        m: *mut i32,
    ) {
        let mut acc = [[_mm512_setzero_si512(); 2]; N];
        for block in 0..blocks {
            // One base for the block: each tile's word is at a constant displacement from it.
            let (vb, ub) = (v.add(block * block_stride), u.add(block * (CB / 2) * OB));
            for k in 0..CB / 2 {
                let u0 = _mm512_loadu_si512(ub.add(k * OB).cast());
                let u1 = _mm512_loadu_si512(ub.add(k * OB + LANES).cast());
                for (t, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_epi32(*vb.add(t * (CB / 2) + k));
                    acc[0] = _mm512_dpwssd_epi32(acc[0], b, u0);
                    acc[1] = _mm512_dpwssd_epi32(acc[1], b, u1);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm512_storeu_si512(m.add(t * OB).cast(), acc[0]);
            _mm512_storeu_si512(m.add(t * OB + LANES).cast(), acc[1]);
        }
    }

    /// Six vectors `step` words apart from `first`: one column of a 6x6 patch.
    /// Safety: AVX-512F; the six vectors are readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_column(first: *const i32, step: usize) -> [__m512i; 6] {
        let mut column = [_mm512_setzero_si512(); 6];
        for (r, value) in column.iter_mut().enumerate() {
            *value = _mm512_loadu_si512(first.add(r * step).cast());
        }
        column
    }

    impl Run<'_> {
        /// Image, tile row and tile column of tile `tile` of the batch (row by row, image after
        /// image).
        fn tile_at(&self, tile: usize) -> (usize, usize, usize) {
            let (tw, per_image) = (self.w / 4, (self.h / 4) * (self.w / 4));
            (tile / per_image, tile % per_image / tw, tile % tw)
        }

        /// Tiles `tiles` of the batch (row by row, image after image): transformed, multiplied
        /// and written to the output.
        /// Safety: as [`Weights::run`]; no other item writes these tiles' pixels.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn item(&self, tiles: std::ops::Range<usize>, v: &mut Vec<i32>, m: &mut Vec<i32>) {
            let wt = self.wt;
            let (count, blocks) = (tiles.len(), wt.ci / CB);
            let (pw, pixels) = (self.w + 2, (self.h + 2) * (self.w + 2));
            // One cache line more per run of tiles: runs of 64 tiles are 4 KB (8 KB) apart, so
            // the 36 entries of one tile, written (read back) one after another, all fell in one
            // set of the 8-way L1 cache.
            let (v_run, m_run) = (count * (CB / 2) + LANES, count * OB + LANES);
            if v.len() < P * blocks * v_run {
                v.resize(P * blocks * v_run, 0);
            }
            if m.len() < P * m_run {
                m.resize(P * m_run, 0);
            }
            // Buffers of vectors are made once: made per use, each was a `memset` call.
            let mut rows = [[_mm512_setzero_si512(); 6]; 6];
            let mut out = [[_mm512_setzero_ps(); LANES]; 4];
            for (t, tile) in tiles.clone().enumerate() {
                let (b, ty, tx) = self.tile_at(tile);
                for block in 0..blocks {
                    let corner = (b * blocks + block) * pixels + 4 * ty * pw + 4 * tx;
                    let src = self.quantized.ptr().add(corner * LANES).cast_const();
                    for c in 0..6 {
                        // The patch is inside the padded plane (whole tiles).
                        let column = load_column(src.add(c * LANES), pw * LANES);
                        for (r, value) in input_transform(column).into_iter().enumerate() {
                            rows[r][c] = value;
                        }
                    }
                    for (i, row) in rows.iter().enumerate() {
                        for (j, value) in input_transform(*row).into_iter().enumerate() {
                            let at = ((i * 6 + j) * blocks + block) * v_run + t * (CB / 2);
                            _mm512_storeu_si512(v.as_mut_ptr().add(at).cast(), value);
                        }
                    }
                }
            }
            for ob in 0..wt.co / OB {
                for p in 0..P {
                    let u = wt.u.as_ptr().add((ob * P + p) * (wt.ci / 2) * OB);
                    let mut t = 0;
                    while t < count {
                        let vp = v.as_ptr().add(p * blocks * v_run + t * (CB / 2));
                        let mp = m.as_mut_ptr().add(p * m_run + t * OB);
                        let vb = (blocks, v_run);
                        match (count - t).min(NT) {
                            12 => products::<12>(vp, vb, u, mp),
                            11 => products::<11>(vp, vb, u, mp),
                            10 => products::<10>(vp, vb, u, mp),
                            9 => products::<9>(vp, vb, u, mp),
                            8 => products::<8>(vp, vb, u, mp),
                            7 => products::<7>(vp, vb, u, mp),
                            6 => products::<6>(vp, vb, u, mp),
                            5 => products::<5>(vp, vb, u, mp),
                            4 => products::<4>(vp, vb, u, mp),
                            3 => products::<3>(vp, vb, u, mp),
                            2 => products::<2>(vp, vb, u, mp),
                            _ => products::<1>(vp, vb, u, mp),
                        }
                        t += NT;
                    }
                }
                let mut t = 0;
                while t < count {
                    for half in 0..2 {
                        let sums = m.as_ptr().add(t * OB + half * LANES);
                        let o0 = ob * OB + half * LANES;
                        self.store(sums, m_run, tiles.start + t, (self.group, o0), &mut out);
                    }
                    t += self.group;
                }
            }
        }

        /// The products of `group` tiles side by side in one tile row (from `tile` on; the
        /// first's sums at `sums`, the next's `OB` further, entries `stride` apart), output
        /// channels `o0 .. o0 + 16`: transformed back, dequantized as the direct kernel does,
        /// and stored a row of `4 group` pixels per channel at a time.
        /// `pixels` is room for the values: `[tile][pixel 4 i + j]`, lanes along the channels.
        /// Safety: as [`Run::item`]; `group` is 1, 2 or 4 and the tiles are in one tile row.
        #[target_feature(enable = "avx512f")]
        unsafe fn store(
            &self,
            sums: *const i32,
            stride: usize,
            tile: usize,
            (group, o0): (usize, usize),
            pixels: &mut [[__m512; LANES]; 4],
        ) {
            let wt = self.wt;
            let (b, ty, tx0) = self.tile_at(tile);
            let multiplier = _mm512_loadu_ps(wt.multiplier.as_ptr().add(o0));
            for (g, pixels) in pixels.iter_mut().enumerate().take(group) {
                let sums = sums.add(g * OB);
                let mut half = [[_mm512_setzero_si512(); 6]; 4];
                for c in 0..6 {
                    // 36 entries of 16 sums each, `stride` apart, row by row.
                    let column = load_column(sums.add(c * stride), 6 * stride);
                    for (r, value) in output_transform(column).into_iter().enumerate() {
                        half[r][c] = value;
                    }
                }
                for (i, row) in half.iter().enumerate() {
                    for (j, sum) in output_transform(*row).into_iter().enumerate() {
                        // 576 S modulo 2^32 -> 64 S modulo 2^32, which is 64 S itself
                        // (|S| < 2^25) -> S.
                        let s = _mm512_mullo_epi32(sum, _mm512_set1_epi32(INV9));
                        let mut s = _mm512_srai_epi32::<6>(s);
                        let column = 4 * (tx0 + g) + j;
                        let kind = if column == 0 {
                            1
                        } else if column + 1 == self.w {
                            2
                        } else {
                            0
                        };
                        if kind > 0 {
                            let missing = wt.missing[kind - 1].as_ptr().add(o0);
                            s = _mm512_sub_epi32(s, _mm512_loadu_si512(missing.cast()));
                        }
                        let value = _mm512_mul_ps(_mm512_cvtepi32_ps(s), multiplier);
                        let offset = _mm512_loadu_ps(wt.offset[kind].as_ptr().add(o0));
                        pixels[i * 4 + j] = _mm512_add_ps(value, offset);
                    }
                }
            }
            let hw = self.h * self.w;
            let mask: __mmask16 = if group == 4 { !0 } else { (1u16 << (4 * group)) - 1 };
            // Rows past 4 group keep stale values: they land in lanes the masked store skips.
            let mut lanes = [_mm512_setzero_si512(); LANES];
            for i in 0..4 {
                // One output row of the group: 4 group pixels, transposed to lanes along them.
                for g in 0..group {
                    for j in 0..4 {
                        lanes[g * 4 + j] = _mm512_castps_si512(pixels[g][i * 4 + j]);
                    }
                }
                transpose(&mut lanes);
                for (k, &channel) in lanes.iter().enumerate() {
                    let o = o0 + k;
                    let at = (b * wt.co + o) * hw + (4 * ty + i) * self.w + 4 * tx0;
                    let mut row = _mm512_castsi512_ps(channel);
                    row = match self.addend {
                        None => row,
                        Some(Addend::PerChannel(a)) => {
                            _mm512_add_ps(row, _mm512_set1_ps(a[b * wt.co + o]))
                        }
                        Some(Addend::Full(a)) => {
                            _mm512_add_ps(row, _mm512_maskz_loadu_ps(mask, a.as_ptr().add(at)))
                        }
                    };
                    _mm512_mask_storeu_ps(self.out.ptr().add(at), mask, row);
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn transposed(rows: [[i32; LANES]; LANES]) -> [[i32; LANES]; LANES] {
        // SAFETY: only called where the test checked AVX-512F.
        unsafe {
            let mut r = rows.map(|row| _mm512_loadu_si512(row.as_ptr().cast()));
            transpose(&mut r);
            r.map(|v| {
                let mut out = [0i32; LANES];
                _mm512_storeu_si512(out.as_mut_ptr().cast(), v);
                out
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose_moves_each_lane_to_its_mirror() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            crate::test_skip::note("the 16x16 transpose: this CPU has no AVX-512F");
            return;
        }
        let rows = std::array::from_fn(|i| std::array::from_fn(|j| (i * 100 + j) as i32));
        let t = kernel::transposed(rows);
        for i in 0..LANES {
            for j in 0..LANES {
                assert_eq!(t[j][i], rows[i][j], "row {i} lane {j}");
            }
        }
    }

    #[test]
    fn refuses_shapes_and_sums_it_cannot_recover() {
        let ok = |co: usize, ci: usize, w: i8| {
            let wt = vec![w; co * ci * 9];
            Weights::new(&wt, (co, ci), 128, &vec![1.0; co], &vec![[0.0; 4]; co]).is_some()
        };
        assert!(ok(32, 32, 127));
        assert!(!ok(32, 48, 1), "input channels not a multiple of 32");
        assert!(!ok(48, 32, 1), "output channels not a multiple of 32");
        // 255 x 9 x 96 x 127 = 27 980 640 < 2^25 = 33 554 432 <= 255 x 9 x 128 x 127.
        assert!(ok(32, 96, -127));
        assert!(!ok(32, 128, -127));
        assert!(ok(32, 128, 100));
    }
}
