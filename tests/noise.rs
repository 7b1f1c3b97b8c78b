//! The seeded noise streams: determinism, independence of keys, batch-position independence of
//! a whole purification, and the statistics of the Gaussian sampler.

use diffshield::noise::{fill_standard_normal, stream, NoiseSource, SeededNoise, StreamId};
use diffshield::purify::purify;
use diffshield::{DdimPlan, Denoiser, PlanSpec, Result, Schedule};
use ndarray::{concatenate, s, Array4, ArrayView4, Axis};

const PER_IMAGE: usize = 3 * 32 * 32;

fn id(frame: u64, vote: u32) -> StreamId {
    StreamId::of_frame(frame, vote)
}

/// Noise of (seed, frame, vote, draw) through the public `NoiseSource` interface.
fn draw_of(seed: u64, frame: u64, vote: u32, draw: usize) -> Vec<f32> {
    draw_n(seed, frame, vote, draw, PER_IMAGE)
}

/// The first `len` values of that noise.
fn draw_n(seed: u64, frame: u64, vote: u32, draw: usize, len: usize) -> Vec<f32> {
    let mut noise = SeededNoise::new(seed, vec![id(frame, vote)]);
    let mut out = vec![0.0f32; len];
    noise.fill(draw, 0, &mut out);
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let mb = b.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// A cheap elementwise denoiser (exact eps of N(0.1, 0.2^2) data), enough to run the purifier.
struct GaussianDenoiser(Schedule);

impl Denoiser for GaussianDenoiser {
    fn predict_eps(&mut self, x_t: ArrayView4<f32>, t: u32) -> Result<Array4<f32>> {
        let a = self.0.abar(t);
        let v = a * 0.04 + 1.0 - a;
        Ok(x_t.mapv(|x| ((1.0 - a).sqrt() * (f64::from(x) - a.sqrt() * 0.1) / v) as f32))
    }
}

fn plan(eta: f64) -> DdimPlan {
    DdimPlan::new(&Schedule::ddpm_linear_1000(), 1..=500, 140, &PlanSpec::Stride(10), eta).unwrap()
}

/// A deterministic pseudo-image in [0,1].
fn image(k: usize) -> Array4<f32> {
    Array4::from_shape_fn((1, 3, 32, 32), |(_, c, h, w)| {
        let v = ((c * 1031 + h * 97 + w * 13 + k * 7919) % 1000) as f32;
        v / 999.0
    })
}

#[test]
fn same_key_gives_identical_noise() {
    for (seed, frame, vote, draw) in
        [(0, 0, 0, 0), (42, 7, 3, 5), (u64::MAX, u64::MAX, u32::MAX, 14)]
    {
        let a = draw_of(seed, frame, vote, draw);
        let b = draw_of(seed, frame, vote, draw);
        assert_eq!(bits(&a), bits(&b), "key ({seed},{frame},{vote},{draw})");
        assert!(a.iter().all(|v| v.is_finite()));
        // SeededNoise is exactly the documented stream of its key.
        let mut c = vec![0.0f32; PER_IMAGE];
        fill_standard_normal(&mut stream(seed, frame, vote, draw as u32), &mut c);
        assert_eq!(bits(&a), bits(&c));
    }
    // Filling the same item twice from one source does not advance any state.
    let mut noise = SeededNoise::new(9, vec![id(1, 0), id(2, 0)]);
    let (mut a, mut b) = (vec![0.0f32; 100], vec![0.0f32; 100]);
    noise.fill(3, 1, &mut a);
    noise.fill(3, 0, &mut b);
    noise.fill(3, 1, &mut b);
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(noise.items(), &[id(1, 0), id(2, 0)]);
}

#[test]
fn full_purification_is_bit_reproducible() {
    let img = image(1);
    let run = || {
        let mut den = GaussianDenoiser(Schedule::ddpm_linear_1000());
        let mut noise = SeededNoise::new(1234, vec![id(5, 2)]);
        purify(&plan(1.0), &mut den, img.view(), &mut noise).unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(bits(a.as_slice().unwrap()), bits(b.as_slice().unwrap()));
    // And it is not trivially the input (the noise and the denoiser did something).
    assert!(a.iter().zip(img.iter()).any(|(x, y)| (x - y).abs() > 0.05));
    // Another seed gives another purification.
    let mut den = GaussianDenoiser(Schedule::ddpm_linear_1000());
    let mut noise = SeededNoise::new(1235, vec![id(5, 2)]);
    let c = purify(&plan(1.0), &mut den, img.view(), &mut noise).unwrap();
    assert!(a.iter().zip(c.iter()).filter(|(x, y)| x != y).count() > PER_IMAGE * 9 / 10);
}

#[test]
fn different_keys_give_different_uncorrelated_noise() {
    // 65536 values per key: the standard error of r is 0.004, the bound 0.02 is 5 of them.
    const LONG: usize = 65536;
    let d = |seed, frame, vote, draw| draw_n(seed, frame, vote, draw, LONG);
    let base = d(11, 3, 0, 0);
    let pairs = [
        ("seed", base.clone(), d(12, 3, 0, 0)),
        ("vote 1", base.clone(), d(11, 3, 1, 0)),
        ("vote 2", base.clone(), d(11, 3, 2, 0)),
        ("frame", base.clone(), d(11, 4, 0, 0)),
        ("draw", base.clone(), d(11, 3, 0, 1)),
        // Keys that a naive xor or sum of the fields would confuse.
        ("frame/vote swap", d(11, 3, 1, 0), d(11, 1, 3, 0)),
        ("vote/draw swap", d(11, 3, 1, 2), d(11, 3, 2, 1)),
        ("frame/seed swap", d(3, 11, 0, 0), base.clone()),
    ];
    for (what, a, b) in &pairs {
        let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
        assert!(equal < 5, "{what}: {equal} equal values of {LONG}");
        let r = correlation(a, b);
        eprintln!("correlation across {what}: {r:+.4}");
        assert!(r.abs() < 0.02, "{what}: correlation {r}");
    }
    // The votes of one frame, each a full 3x32x32 image of noise (3072 values), are mutually
    // uncorrelated streams.
    let votes: Vec<Vec<f32>> = (0..4).map(|v| draw_of(11, 3, v, 2)).collect();
    for i in 0..4 {
        for j in i + 1..4 {
            let r = correlation(&votes[i], &votes[j]);
            eprintln!("correlation of votes {i},{j} over {PER_IMAGE}: {r:+.4}");
            assert!(r.abs() < 0.05, "votes {i},{j}: correlation {r}");
        }
    }
}

#[test]
fn frame_noise_does_not_depend_on_batch_position() {
    let (a, b) = (image(1), image(2));
    let (ida, idb) = (id(100, 0), id(200, 1));
    let run = |first: &Array4<f32>, second: &Array4<f32>, ids: Vec<StreamId>| {
        let batch = concatenate(Axis(0), &[first.view(), second.view()]).unwrap();
        let mut den = GaussianDenoiser(Schedule::ddpm_linear_1000());
        let mut noise = SeededNoise::new(77, ids);
        purify(&plan(1.0), &mut den, batch.view(), &mut noise).unwrap()
    };
    let ab = run(&a, &b, vec![ida, idb]);
    let ba = run(&b, &a, vec![idb, ida]);
    let slice_bits =
        |x: &Array4<f32>, i: usize| bits(x.slice(s![i, .., .., ..]).to_owned().as_slice().unwrap());
    assert_eq!(slice_bits(&ab, 0), slice_bits(&ba, 1), "frame a moved with its position");
    assert_eq!(slice_bits(&ab, 1), slice_bits(&ba, 0), "frame b moved with its position");
    // Alone in a batch of one, a frame gets the same result again.
    let mut den = GaussianDenoiser(Schedule::ddpm_linear_1000());
    let alone =
        purify(&plan(1.0), &mut den, a.view(), &mut SeededNoise::new(77, vec![ida])).unwrap();
    assert_eq!(slice_bits(&ab, 0), slice_bits(&alone, 0));
    // Control: it is the StreamId, not the content, that fixes the noise. Swapping the ids
    // while keeping the images in place changes both results.
    let swapped = run(&a, &b, vec![idb, ida]);
    assert_ne!(slice_bits(&ab, 0), slice_bits(&swapped, 0));
    assert_ne!(slice_bits(&ab, 1), slice_bits(&swapped, 1));
}

#[test]
fn gaussian_sampler_moments() {
    const N: usize = 1_000_000;
    let mut x = vec![0.0f32; N];
    fill_standard_normal(&mut stream(2024, 0, 0, 0), &mut x);
    assert!(x.iter().all(|v| v.is_finite()));
    let n = N as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let m = |p: i32| x.iter().map(|&v| (f64::from(v) - mean).powi(p)).sum::<f64>() / n;
    let (var, m3, m4) = (m(2), m(3), m(4));
    let skew = m3 / var.powf(1.5);
    let kurt = m4 / (var * var);
    let tail3 = x.iter().filter(|v| v.abs() > 3.0).count() as f64 / n;
    let below1 = x.iter().filter(|&&v| v < -1.0).count() as f64 / n;
    eprintln!(
        "N(0,1) sampler over {N}: mean {mean:+.5}, var {var:.5}, skew {skew:+.5}, kurtosis {kurt:.4}, \
         P(|x|>3) {tail3:.5} (0.00270), P(x<-1) {below1:.5} (0.15866)"
    );
    // Standard errors: mean 0.001, var 0.0014, skew 0.0024, kurtosis 0.0049.
    assert!(mean.abs() < 0.005, "mean {mean}");
    assert!((var - 1.0).abs() < 0.01, "var {var}");
    assert!(skew.abs() < 0.015, "skewness {skew}");
    assert!((kurt - 3.0).abs() < 0.03, "kurtosis {kurt}");
    assert!((tail3 - 0.0026998).abs() < 0.0003, "P(|x|>3) = {tail3}");
    assert!((below1 - 0.1586553).abs() < 0.002, "P(x<-1) = {below1}");
    // Neighbouring samples (the two halves of a Box-Muller pair, and across pairs) are
    // uncorrelated.
    let r1 = correlation(&x[..N - 1], &x[1..]);
    let r2 = correlation(&x[..N - 2], &x[2..]);
    assert!(r1.abs() < 0.005 && r2.abs() < 0.005, "lag correlations {r1} {r2}");
}

#[test]
fn odd_lengths_are_filled_completely() {
    for len in [1usize, 3, 7, 3073] {
        let mut x = vec![f32::NAN; len];
        fill_standard_normal(&mut stream(5, 0, 0, 0), &mut x);
        assert!(x.iter().all(|v| v.is_finite()), "len {len}");
    }
}
