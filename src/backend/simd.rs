//! The vector operations this crate's kernels are written in, once per instruction set, and
//! the choice of instruction set ([`KernelLevel`]).
//!
//! A kernel is written once, generic over [`Simd`], with `#[inline(always)]` all the way down,
//! and instantiated inside a `#[target_feature]` function per level: the intrinsics inline
//! into that function, so each level compiles to its own instructions (AVX-512: 16 lanes in 32
//! registers; AVX2 + FMA: 8 lanes in 16 registers). [`Portable`] holds 8 lanes in a plain array
//! and has no intrinsics: the compiler vectorises it for the target's baseline (SSE2 on x86-64,
//! NEON on aarch64), so it runs on every CPU. [`PortableFma`] is the same plain Rust with its
//! multiply-adds fused, which is what it compiles to on aarch64; on x86-64 it runs at the
//! `portable-fma` level, compiled for AVX2 + FMA, so that the ARM configuration of the portable
//! kernels (fused multiply-adds, the 32-register tiles) is tested and timed natively here.

/// Which of this crate's kernels run, from the fastest the CPU has down to none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelLevel {
    /// tract's own ops everywhere (this crate's graph passes off).
    Tract,
    /// The fused GroupNorm, attention and the 3x3 (stride 1 and 2) and 1x1 convs (direct and
    /// Winograd) in plain Rust the compiler vectorises; int8 convs stay tract's. The best
    /// level on CPUs other than x86-64 (ARM) and on x86-64 without AVX2.
    Portable,
    /// The portable level's plain Rust in its aarch64 configuration (fused multiply-adds,
    /// aarch64's tiles), compiled for AVX2 + FMA: x86-64 only, where the CPU has both. Never
    /// the best level (the AVX2 kernels run there, forced only): it exists so that the code
    /// ARM runs is tested on every CI run, and timed against tract's own kernels with the
    /// arithmetic NEON has (fused multiply-adds, tiles that fit the registers).
    PortableFma,
    /// AVX2 + FMA kernels (8-lane tiles); int8 convs stay tract's.
    Avx2,
    /// AVX-512F kernels (16-lane tiles), and the int8 conv where the CPU has AVX-512 VNNI.
    Avx512,
}

/// Environment switch: forces a [`KernelLevel`] (`avx512`, `avx2`, `portable-fma`, `portable`,
/// `tract`) so that tests and benches can run each path on one machine. A level the CPU cannot
/// run is an error.
pub const KERNELS_ENV: &str = "DIFFSHIELD_KERNELS";

impl KernelLevel {
    /// Every level, fastest first.
    pub const ALL: [KernelLevel; 5] = [
        KernelLevel::Avx512,
        KernelLevel::Avx2,
        KernelLevel::PortableFma,
        KernelLevel::Portable,
        KernelLevel::Tract,
    ];

    /// The name [`KERNELS_ENV`] takes.
    pub fn name(self) -> &'static str {
        match self {
            KernelLevel::Tract => "tract",
            KernelLevel::Portable => "portable",
            KernelLevel::PortableFma => "portable-fma",
            KernelLevel::Avx2 => "avx2",
            KernelLevel::Avx512 => "avx512",
        }
    }

    /// True when this CPU can run the level's kernels (detected at run time).
    pub fn supported(self) -> bool {
        match self {
            KernelLevel::Tract | KernelLevel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx2 | KernelLevel::PortableFma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            KernelLevel::Avx2 | KernelLevel::PortableFma | KernelLevel::Avx512 => false,
        }
    }

    /// The fastest level this CPU runs: avx512, else avx2, else `portable` (on x86-64 without
    /// AVX2 it runs 4.8-14x faster than tract's own SSE2 path: benches/compare_levels.py
    /// --isa sse2).
    pub fn best() -> KernelLevel {
        [KernelLevel::Avx512, KernelLevel::Avx2]
            .into_iter()
            .find(|l| l.supported())
            .unwrap_or(KernelLevel::Portable)
    }

    /// The level named by `name` ([`KernelLevel::name`]). Errors name the choices, and the
    /// missing instruction set when this CPU cannot run it.
    pub fn parse(name: &str) -> Result<KernelLevel, String> {
        let level = KernelLevel::ALL.into_iter().find(|l| l.name() == name).ok_or_else(|| {
            format!(
                "unknown kernel level {name:?}: use avx512, avx2, portable-fma, portable or tract"
            )
        })?;
        if !level.supported() {
            let missing = match level {
                KernelLevel::Avx512 => "AVX-512F",
                _ => "AVX2 and FMA",
            };
            return Err(format!("kernel level {name} needs {missing}, which this CPU lacks"));
        }
        Ok(level)
    }

    /// The level of this process: [`KERNELS_ENV`] when set, `tract` when the older
    /// `DIFFSHIELD_TRACT_ONLY` is `1`, else [`KernelLevel::best`]. Errors on an unknown level,
    /// one this CPU cannot run, or a value other than `0` / `1` in any of the switches
    /// (`DIFFSHIELD_TRACT_ONLY`, `DIFFSHIELD_WINOGRAD`, `DIFFSHIELD_TRACT_THREADS`).
    pub fn from_env() -> Result<KernelLevel, String> {
        // Called wherever a CPU model is loaded, so a bad value in any switch stops it there.
        super::switches::check()?;
        match std::env::var(KERNELS_ENV) {
            Ok(name) => {
                KernelLevel::parse(name.trim()).map_err(|e| format!("{KERNELS_ENV}={name}: {e}"))
            }
            Err(_) if !super::tract_opt::own_kernels_enabled() => Ok(KernelLevel::Tract),
            Err(_) => Ok(KernelLevel::best()),
        }
    }
}

/// This machine's CPU as the operating system names it: Linux's `model name` (x86), else its
/// `CPU implementer` and `CPU part` (ARM), else the architecture (`aarch64`). Reports and
/// tune's cache keys quote it, since latencies belong to the CPU they were measured on.
pub fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    if let Some(name) = field("model name").filter(|n| !n.is_empty()) {
        return name;
    }
    match (field("CPU implementer"), field("CPU part")) {
        (Some(implementer), Some(part)) => {
            format!("{} implementer {implementer} part {part}", std::env::consts::ARCH)
        }
        _ => std::env::consts::ARCH.to_string(),
    }
}

/// True on x86-64 CPUs that run AVX-512 at half the rate per instruction: AMD's Zen 4 (family
/// 0x19, the only family of that number with AVX-512; Zen 3 has none) executes each 512-bit FMA
/// as two 256-bit halves, so its AVX-512 level has AVX2's arithmetic rate and Winograd's saved
/// multiplies pay on more convs (Zen 5, family 0x1a, and Intel's cores run them whole). Read
/// once (cpuid traps to the hypervisor in a VM).
pub(crate) fn avx512_is_half_rate() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HALF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HALF.get_or_init(|| {
            use std::arch::x86_64::__cpuid;
            let (vendor, signature) = (__cpuid(0), __cpuid(1).eax);
            let amd =
                (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
            let family = ((signature >> 8) & 0xf) + ((signature >> 20) & 0xff);
            amd && family == 0x19 && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The levels a kernel test runs: the one [`KERNELS_ENV`] forces (the test fails when this CPU
/// cannot run it), else every level with kernels that this CPU runs, printing the others.
#[cfg(test)]
pub(crate) fn levels_under_test() -> Vec<KernelLevel> {
    if let Ok(name) = std::env::var(KERNELS_ENV) {
        let level =
            KernelLevel::parse(name.trim()).unwrap_or_else(|e| panic!("{KERNELS_ENV}: {e}"));
        assert!(level != KernelLevel::Tract, "{KERNELS_ENV}=tract forces no kernel to test");
        return vec![level];
    }
    let (run, skip): (Vec<KernelLevel>, Vec<KernelLevel>) = KernelLevel::ALL
        .into_iter()
        .filter(|&l| l != KernelLevel::Tract)
        .partition(|l| l.supported());
    for level in skip {
        crate::test_skip::note(&format!(
            "kernel level {} not tested: this CPU cannot run it",
            level.name()
        ));
    }
    run
}

/// The vector operations of one instruction set. Every function is unsafe: the caller runs it
/// only inside a function compiled for that instruction set (see the module comment) on a CPU
/// that has it, with pointers valid for [`Simd::LANES`] values.
pub(crate) trait Simd: Copy + 'static {
    /// One vector of `LANES` f32.
    type V: Copy;
    /// f32 lanes per vector.
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` values at `p` (`n < LANES`), the other lanes 0; only those `n` values
    /// are read. For a row's last part: a copy of a few values is otherwise a `memcpy` call
    /// (one per row in the Winograd conv was 5 % of a batch-8 f32 denoiser_m call).
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V;
    /// Writes the first `n` lanes of `v` (`n < LANES`) to `p`, nothing past them.
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize);
    /// `a * b + c`, fused where the instruction set has it.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `1 / a`, correctly rounded.
    unsafe fn recip(a: Self::V) -> Self::V;
    /// `e^x` for x <= 87 (softmax arguments, x <= 0, and SiLU's e^-v), within a few ulp on
    /// -87..=87 (below -87 a value under 2^-125, which neither a softmax sum nor 1 + e^-v
    /// notices).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// A hint to bring the cache line at `p` into L2 (a no-op where there is none).
    unsafe fn prefetch_l2(p: *const f32);
    /// `(a0 b0 a1 b1 ..., the second half of that)`: the lanes of `a` and `b` alternating.
    unsafe fn interleave(a: Self::V, b: Self::V) -> (Self::V, Self::V);
    /// The inverse of [`Simd::interleave`]: the even and the odd lanes of `a` then `b`.
    unsafe fn deinterleave(a: Self::V, b: Self::V) -> (Self::V, Self::V);
}

/// Cephes' degree-7 polynomial for e^r on |r| <= ln 2 / 2, shared by every level: x = n ln 2 + r,
/// with ln 2 split so that n * LN2_HI is exact for the n that occur.
const EXP_POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^r` on the reduced argument, by [`EXP_POLY`].
/// Safety: as every [`Simd`] operation: runs inside a function compiled for `S` on a CPU that
/// has it.
#[inline(always)]
unsafe fn exp_poly<S: Simd>(r: S::V) -> S::V {
    let mut y = S::splat(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        y = S::fma(y, r, S::splat(c));
    }
    S::fma(y, S::mul(r, r), S::add(r, S::splat(1.0)))
}

/// The mask of AVX-512's first `n` lanes (`n < 16`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn first_lanes(n: usize) -> u16 {
    (1u16 << n.min(15)) - 1
}

/// AVX2's mask vector of the first `n` lanes (`n < 8`): the sign bit set in each.
/// Safety: the CPU supports AVX2 and the caller is compiled for it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn first_lanes8(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n.min(7) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// AVX-512F, 16 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    type V = std::arch::x86_64::__m512;
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        std::arch::x86_64::_mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V {
        std::arch::x86_64::_mm512_maskz_loadu_ps(first_lanes(n), p)
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize) {
        std::arch::x86_64::_mm512_mask_storeu_ps(p, first_lanes(n), v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn recip(a: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_div_ps(Self::splat(1.0), a)
    }
    /// 2^n applied by `vscalefps`, which also takes care of underflow to 0.
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        _mm512_scalef_ps(exp_poly::<Self>(r), n)
    }
    #[inline(always)]
    unsafe fn prefetch_l2(p: *const f32) {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    }
    #[inline(always)]
    unsafe fn interleave(a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        use std::arch::x86_64::*;
        // Index i < 16 takes a[i], 16 + i takes b[i].
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        (_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b))
    }
    #[inline(always)]
    unsafe fn deinterleave(a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        use std::arch::x86_64::*;
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
    }
}

/// AVX2 + FMA, 8 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    type V = std::arch::x86_64::__m256;
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V {
        std::arch::x86_64::_mm256_maskload_ps(p, first_lanes8(n))
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize) {
        std::arch::x86_64::_mm256_maskstore_ps(p, first_lanes8(n), v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn recip(a: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_div_ps(Self::splat(1.0), a)
    }
    /// 2^n built in the exponent bits; x is clamped to -87 so that n stays a normal exponent.
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(exp_poly::<Self>(r), _mm256_castsi256_ps(bits))
    }
    #[inline(always)]
    unsafe fn prefetch_l2(p: *const f32) {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    }
    /// unpack works within 128-bit halves: (a0 b0 a1 b1 | a4 b4 a5 b5) and (a2 b2 a3 b3 |
    /// a6 b6 a7 b7), then the halves are regrouped.
    #[inline(always)]
    unsafe fn interleave(a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        use std::arch::x86_64::*;
        let (l, h) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        (_mm256_permute2f128_ps::<0x20>(l, h), _mm256_permute2f128_ps::<0x31>(l, h))
    }
    /// shuffle picks within 128-bit halves (a0 a2 b0 b2 | a4 a6 b4 b6), then the 64-bit
    /// quarters are put in order.
    #[inline(always)]
    unsafe fn deinterleave(a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        use std::arch::x86_64::*;
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (order(even), order(odd))
    }
}

/// No intrinsics: 8 lanes in an array, vectorised by the compiler for the build target.
/// `FUSED` makes every multiply-add `f32::mul_add` whatever the build target's baseline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lanes8<const FUSED: bool>;

/// The portable level's vectors: multiply-adds fused where the build target's baseline has FMA
/// (aarch64: `fmla`), a separate multiply and add elsewhere (x86-64's SSE2 baseline, where
/// `mul_add` would be a library call per lane).
pub(crate) type Portable = Lanes8<false>;

/// [`Portable`] as aarch64 builds it, fused multiply-adds included, for the portable-fma
/// level: run only inside functions compiled for `avx2,fma`, where each lane's `mul_add` is one
/// instruction (x86-64 only: on aarch64 [`Portable`] already is this).
#[cfg(target_arch = "x86_64")]
pub(crate) type PortableFma = Lanes8<true>;

/// Lane-wise `f` of two vectors.
#[inline(always)]
fn lanes(a: [f32; 8], b: [f32; 8], f: impl Fn(f32, f32) -> f32) -> [f32; 8] {
    std::array::from_fn(|i| f(a[i], b[i]))
}

impl<const FUSED: bool> Simd for Lanes8<FUSED> {
    type V = [f32; 8];
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        [v; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        p.cast::<[f32; 8]>().read_unaligned()
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        p.cast::<[f32; 8]>().write_unaligned(v)
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V {
        std::array::from_fn(|i| if i < n { p.add(i).read_unaligned() } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize) {
        for (i, &v) in v.iter().enumerate().take(n) {
            p.add(i).write_unaligned(v)
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        if FUSED || cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
            std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
        } else {
            std::array::from_fn(|i| a[i] * b[i] + c[i])
        }
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        lanes(a, b, |a, b| a + b)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        lanes(a, b, |a, b| a - b)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        lanes(a, b, |a, b| a * b)
    }
    /// The comparison form (`maxps` / `fmax`); neither input is ever NaN here.
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        lanes(a, b, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    unsafe fn recip(a: Self::V) -> Self::V {
        a.map(|a| 1.0 / a)
    }
    /// As [`Avx2::exp`], with the exponent bits in plain integer code. Rounding to the nearest
    /// integer adds and subtracts 1.5 * 2^23 (exact for |v| < 2^22): `round_ties_even` is a
    /// library call per lane on CPUs without SSE4.1.
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        const ROUND: f32 = 12_582_912.0;
        let x = x.map(|x| if x > -87.0 { x } else { -87.0 });
        let n = x.map(|x| (x * std::f32::consts::LOG2_E + ROUND) - ROUND);
        let r = lanes(x, n, |x, n| x - n * LN2_HI);
        let r = lanes(r, n, |r, n| r - n * LN2_LO);
        // n + 127 (1..=127) lands in the low mantissa bits of n + 127 + 1.5 * 2^23; shifting
        // them up into the exponent field builds 2^n without a float-to-int conversion (a
        // saturating scalar `as i32` per lane would not vectorise).
        let scale = n.map(|n| f32::from_bits((n + (ROUND + 127.0)).to_bits() << 23));
        Self::mul(exp_poly::<Self>(r), scale)
    }
    #[inline(always)]
    unsafe fn prefetch_l2(_: *const f32) {}
    #[inline(always)]
    unsafe fn interleave(a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        let pick = |i: usize| if i.is_multiple_of(2) { a[i / 2] } else { b[i / 2] };
        (std::array::from_fn(pick), std::array::from_fn(|i| pick(i + 8)))
    }
    #[inline(always)]
    unsafe fn deinterleave(a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        let at = |i: usize| if i < 8 { a[i] } else { b[i - 8] };
        (std::array::from_fn(|i| at(2 * i)), std::array::from_fn(|i| at(2 * i + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest relative error of `S::exp` over -100..=87 (softmax's range and SiLU's), in one
    /// call of `exp_of`.
    fn worst_exp<S: Simd>(exp_of: impl Fn(&[f32], &mut [f32])) -> f64 {
        let mut worst = 0f64;
        let mut x = -100.0f32;
        while x <= 87.0 {
            let xs: Vec<f32> = (0..S::LANES).map(|i| x - i as f32 * 1e-3).collect();
            let mut got = vec![0f32; S::LANES];
            exp_of(&xs, &mut got);
            for (&g, &x) in got.iter().zip(&xs) {
                let want = (x as f64).exp();
                if x >= -87.0 {
                    worst = worst.max((g as f64 - want).abs() / want);
                } else {
                    // Clamped or flushed: tiny next to any softmax sum (which is >= 1).
                    assert!((g as f64) < 2e-38, "e^{x} gave {g}");
                }
            }
            x += 0.0137;
        }
        worst
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_and_silu_range_on_every_level() {
        /// `Avx2::exp` of the first vector of `x` into `y`.
        /// Safety: the CPU supports AVX2 and FMA; `x` and `y` hold at least 8 values.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], y: &mut [f32]) {
            Avx2::store(y.as_mut_ptr(), Avx2::exp(Avx2::load(x.as_ptr())))
        }
        /// `Avx512::exp` of the first vector of `x` into `y`.
        /// Safety: the CPU supports AVX-512F; `x` and `y` hold at least 16 values.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(x: &[f32], y: &mut [f32]) {
            Avx512::store(y.as_mut_ptr(), Avx512::exp(Avx512::load(x.as_ptr())))
        }
        /// `PortableFma::exp` of the first vector of `x` into `y`, compiled for AVX2 + FMA.
        /// Safety: the CPU supports AVX2 and FMA; `x` and `y` hold at least 8 values.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn portable_fma(x: &[f32], y: &mut [f32]) {
            PortableFma::store(y.as_mut_ptr(), PortableFma::exp(PortableFma::load(x.as_ptr())))
        }
        for level in levels_under_test() {
            // SAFETY: `levels_under_test` yields only levels this CPU runs (Portable runs on
            // every CPU); the slices hold a vector each.
            let worst = match level {
                #[cfg(target_arch = "x86_64")]
                KernelLevel::PortableFma => {
                    worst_exp::<PortableFma>(|x, y| unsafe { portable_fma(x, y) })
                }
                #[cfg(target_arch = "x86_64")]
                KernelLevel::Avx2 => worst_exp::<Avx2>(|x, y| unsafe { avx2(x, y) }),
                #[cfg(target_arch = "x86_64")]
                KernelLevel::Avx512 => worst_exp::<Avx512>(|x, y| unsafe { avx512(x, y) }),
                _ => worst_exp::<Portable>(|x, y| unsafe {
                    Portable::store(y.as_mut_ptr(), Portable::exp(Portable::load(x.as_ptr())))
                }),
            };
            assert!(worst < 4e-7, "{}: largest relative error {worst:e}", level.name());
        }
    }

    /// `S::load_first` of `n` values for every `n < S::LANES`, stored whole at the start of
    /// a buffer and by `S::store_first` one vector further, through `copy(src, dst, n)`
    /// ([`first_lanes_copy`] on the level): the loaded lanes past `n` are 0, and the values
    /// past the `n` that `store_first` wrote keep what they held. `src` holds only its `n`
    /// values, so a load past them would be out of its allocation (Miri sees that).
    fn check_first_lanes<S: Simd>(copy: impl Fn(&[f32], &mut [f32], usize)) {
        for n in 0..S::LANES {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
            let mut dst = vec![-7.0f32; 2 * S::LANES];
            copy(&src, &mut dst, n);
            for (i, &d) in dst.iter().enumerate() {
                let lane = i % S::LANES;
                let want = match (i < S::LANES, lane < n) {
                    (_, true) => lane as f32 + 1.0,
                    (true, false) => 0.0,
                    (false, false) => -7.0,
                };
                assert_eq!(d, want, "{} lanes, {n} values: value {i}", S::LANES);
            }
        }
    }

    /// The copy [`check_first_lanes`] checks.
    /// Safety: runs inside a function compiled for `S` on a CPU that has it; `src` holds `n`
    /// values, `dst` two vectors.
    #[inline(always)]
    unsafe fn first_lanes_copy<S: Simd>(src: &[f32], dst: &mut [f32], n: usize) {
        let v = S::load_first(src.as_ptr(), n);
        S::store(dst.as_mut_ptr(), v);
        S::store_first(dst.as_mut_ptr().add(S::LANES), v, n);
    }

    #[test]
    fn partial_loads_and_stores_touch_only_their_lanes_on_every_level() {
        /// Safety: the CPU supports AVX2 and FMA; as [`check_first_lanes`] calls it.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(src: &[f32], dst: &mut [f32], n: usize) {
            first_lanes_copy::<Avx2>(src, dst, n)
        }
        /// Safety: the CPU supports AVX-512F; as [`check_first_lanes`] calls it.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(src: &[f32], dst: &mut [f32], n: usize) {
            first_lanes_copy::<Avx512>(src, dst, n)
        }
        /// Safety: the CPU supports AVX2 and FMA; as [`check_first_lanes`] calls it.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn portable_fma(src: &[f32], dst: &mut [f32], n: usize) {
            first_lanes_copy::<PortableFma>(src, dst, n)
        }
        for level in levels_under_test() {
            // SAFETY: `levels_under_test` yields only levels this CPU runs (Portable runs on
            // every CPU); `check_first_lanes` passes `n` values and two vectors.
            match level {
                #[cfg(target_arch = "x86_64")]
                KernelLevel::PortableFma => {
                    check_first_lanes::<PortableFma>(|s, d, n| unsafe { portable_fma(s, d, n) })
                }
                #[cfg(target_arch = "x86_64")]
                KernelLevel::Avx2 => check_first_lanes::<Avx2>(|s, d, n| unsafe { avx2(s, d, n) }),
                #[cfg(target_arch = "x86_64")]
                KernelLevel::Avx512 => {
                    check_first_lanes::<Avx512>(|s, d, n| unsafe { avx512(s, d, n) })
                }
                _ => check_first_lanes::<Portable>(|s, d, n| unsafe {
                    first_lanes_copy::<Portable>(s, d, n)
                }),
            }
        }
    }

    /// `S::interleave` of 0, 1, 2, ... and 100, 101, ... in one call of `f`.
    fn check_interleave<S: Simd>(f: impl Fn(&[f32], &[f32], &mut [f32])) {
        let a: Vec<f32> = (0..S::LANES).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..S::LANES).map(|i| 100.0 + i as f32).collect();
        let mut out = vec![0f32; 4 * S::LANES];
        f(&a, &b, &mut out);
        let want: Vec<f32> = (0..2 * S::LANES)
            .map(|i| if i.is_multiple_of(2) { a[i / 2] } else { b[i / 2] })
            .collect();
        assert_eq!(out[..2 * S::LANES], want[..], "interleave");
        let back: Vec<f32> = a.iter().chain(&b).copied().collect();
        assert_eq!(out[2 * S::LANES..], back[..], "deinterleave undoes it");
    }

    #[test]
    fn interleave_and_deinterleave_on_every_level() {
        /// Stores `S::interleave(a, b)` and `S::deinterleave` of that into `out`. Safety: the
        /// CPU runs `S`.
        #[inline(always)]
        unsafe fn run<S: Simd>(a: &[f32], b: &[f32], out: &mut [f32]) {
            let (lo, hi) = S::interleave(S::load(a.as_ptr()), S::load(b.as_ptr()));
            S::store(out.as_mut_ptr(), lo);
            S::store(out.as_mut_ptr().add(S::LANES), hi);
            let (even, odd) = S::deinterleave(lo, hi);
            S::store(out.as_mut_ptr().add(2 * S::LANES), even);
            S::store(out.as_mut_ptr().add(3 * S::LANES), odd);
        }
        // SAFETY: Portable runs everywhere; the others only where detected.
        check_interleave::<Portable>(|a, b, o| unsafe { run::<Portable>(a, b, o) });
        #[cfg(target_arch = "x86_64")]
        {
            /// `run` on `Avx2`.
            /// Safety: the CPU supports AVX2 and FMA; `a` and `b` hold at least 8 values, `o` 32.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(a: &[f32], b: &[f32], o: &mut [f32]) {
                run::<Avx2>(a, b, o)
            }
            /// `run` on `Avx512`.
            /// Safety: the CPU supports AVX-512F; `a` and `b` hold at least 16 values, `o` 64.
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(a: &[f32], b: &[f32], o: &mut [f32]) {
                run::<Avx512>(a, b, o)
            }
            /// `run` on `PortableFma`, compiled for AVX2 + FMA.
            /// Safety: the CPU supports AVX2 and FMA; `a` and `b` hold at least 8 values, `o` 32.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn portable_fma(a: &[f32], b: &[f32], o: &mut [f32]) {
                run::<PortableFma>(a, b, o)
            }
            if KernelLevel::Avx2.supported() {
                check_interleave::<Avx2>(|a, b, o| unsafe { avx2(a, b, o) });
                check_interleave::<PortableFma>(|a, b, o| unsafe { portable_fma(a, b, o) });
            }
            if KernelLevel::Avx512.supported() {
                check_interleave::<Avx512>(|a, b, o| unsafe { avx512(a, b, o) });
            }
        }
    }

    #[test]
    fn levels_parse_and_refuse_what_the_cpu_lacks() {
        assert_eq!(KernelLevel::parse("portable"), Ok(KernelLevel::Portable));
        assert_eq!(KernelLevel::parse("tract"), Ok(KernelLevel::Tract));
        let err = KernelLevel::parse("neon").unwrap_err();
        assert!(err.contains("avx512, avx2, portable-fma, portable or tract"), "{err}");
        assert_eq!(KernelLevel::PortableFma.supported(), KernelLevel::Avx2.supported());
        for level in [KernelLevel::PortableFma, KernelLevel::Avx2, KernelLevel::Avx512] {
            match KernelLevel::parse(level.name()) {
                Ok(l) => assert!(l == level && level.supported()),
                Err(e) => assert!(!level.supported() && e.contains("which this CPU lacks"), "{e}"),
            }
        }
        assert!(KernelLevel::best().supported());
    }
}
