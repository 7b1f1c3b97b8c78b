//! Throughput of the 512-bit multiply-accumulate instructions the CPU kernels are built on:
//! `vfmadd231ps` (16 f32 products), `vdpbf16ps` (32 bf16 products) and `vpdpbusd` (64 u8 x s8
//! products), and of `vpdpwssd` (32 i16 x i16 products), which an exact integer Winograd conv
//! would need; each on 12 independent accumulators so that latency does not count.
//! The figures behind docs/int8.md's bf16 attention, the README's estimate of the int8
//! convs' peak and docs/int8.md's reckoning of an int8 Winograd. Usage: `cargo run --release --example dot_rates [millions of iterations]`.

#[cfg(target_arch = "x86_64")]
mod rates {
    use std::arch::x86_64::*;

    const CHAINS: usize = 12;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        let (a, b) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, b, *x);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16(n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        // SAFETY: both types are 64 bytes of plain lanes; every bit pattern is valid in each.
        let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80));
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, a);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vnni(n: usize) -> i32 {
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        let a = _mm512_set1_epi32(0x0101_0101);
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, a);
            }
        }
        acc.iter().fold(0i32, |s, &x| s.wrapping_add(_mm512_reduce_add_epi32(x)))
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vnni16(n: usize) -> i32 {
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        let a = _mm512_set1_epi32(0x0001_0001);
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_dpwssd_epi32(*x, a, a);
            }
        }
        acc.iter().fold(0i32, |s, &x| s.wrapping_add(_mm512_reduce_add_epi32(x)))
    }

    /// Nanoseconds per instruction of `f` over `n` iterations of `CHAINS` instructions.
    pub fn ns_per_instruction<R>(n: usize, f: impl Fn(usize) -> R) -> f64 {
        let start = std::time::Instant::now();
        let result = f(n);
        let ns = start.elapsed().as_secs_f64() * 1e9 / (n * CHAINS) as f64;
        // Keeps the loop from being optimised away.
        std::hint::black_box(result);
        ns
    }
}

fn main() -> anyhow::Result<()> {
    let millions: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let n = millions * 1_000_000;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if !has!("avx512f") {
            println!("this CPU has no AVX-512F: nothing to measure");
            return Ok(());
        }
        // SAFETY (every call): each runs only where its instructions were detected.
        let fma = rates::ns_per_instruction(n, |n| unsafe { rates::fma(n) });
        println!("vfmadd231ps zmm (16 f32 products): {fma:.3} ns per instruction");
        if has!("avx512bf16") {
            let bf = rates::ns_per_instruction(n, |n| unsafe { rates::bf16(n) });
            println!("vdpbf16ps zmm (32 bf16 products): {bf:.3} ns per instruction");
        } else {
            println!("vdpbf16ps: this CPU has no AVX-512 BF16");
        }
        if has!("avx512vnni") {
            let vn = rates::ns_per_instruction(n, |n| unsafe { rates::vnni(n) });
            println!("vpdpbusd zmm (64 u8 x s8 products): {vn:.3} ns per instruction");
            let vw = rates::ns_per_instruction(n, |n| unsafe { rates::vnni16(n) });
            println!("vpdpwssd zmm (32 i16 x i16 products): {vw:.3} ns per instruction");
        } else {
            println!("vpdpbusd: this CPU has no AVX-512 VNNI");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only: nothing to measure on this CPU ({n} iterations asked)");
    Ok(())
}
