//! The purifier against the shared golden vectors (tests/vectors, copied from
//! ../shared/vectors): same images and injected noise in, every x_t, eps, x0 estimate, the
//! purified images and the logits out, to float32 tolerance.

mod common;

use common::{max_abs_diff, models_dir, read_npy};
use diffshield::backend::tract::{TractClassifier, TractDenoiser};
use diffshield::manifest::Manifest;
use diffshield::noise::FixedNoise;
use diffshield::purify::Purification;
use diffshield::{Classifier, DdimPlan, PlanSpec};
use ndarray::{Array4, ArrayView4};
use std::path::PathBuf;

fn vec_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn load4(name: &str) -> (Vec<usize>, Vec<f32>) {
    let a = read_npy(&vec_dir().join(name));
    (a.shape, a.data.into_iter().map(|v| v as f32).collect())
}

/// Slice k of a [K, 4, 3, 32, 32] array as f64 values.
fn slice(all: &[f32], k: usize) -> impl Iterator<Item = f64> + '_ {
    let n = 4 * 3 * 32 * 32;
    all[k * n..(k + 1) * n].iter().map(|&v| v as f64)
}

fn flat(a: ArrayView4<f32>) -> Vec<f64> {
    a.iter().map(|&v| v as f64).collect()
}

#[test]
fn purifier_reproduces_golden_vectors() {
    let manifest = Manifest::load(&models_dir()).unwrap();
    let schedule = manifest.schedule().unwrap();
    let entry = manifest.denoiser("s").unwrap();
    let plan =
        DdimPlan::new(&schedule, entry.trained_range(), 140, &PlanSpec::Stride(10), 1.0).unwrap();
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vec_dir().join("README.json")).unwrap())
            .unwrap();
    let want_t: Vec<u32> = readme["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(plan.timesteps(), want_t.as_slice());
    for (step, sigma) in plan.steps().iter().zip(readme["sigma_per_step"].as_array().unwrap()) {
        assert!((step.sigma - sigma.as_f64().unwrap()).abs() < 1e-12, "sigma at t={}", step.t);
    }

    let (_, input) = load4("input.npy");
    let images = Array4::from_shape_vec((4, 3, 32, 32), input).unwrap();
    let (nshape, noise) = load4("noise.npy");
    let per = 3 * 32 * 32;
    let draws = (0..nshape[0])
        .map(|d| (0..4).map(|i| noise[(d * 4 + i) * per..(d * 4 + i + 1) * per].to_vec()).collect())
        .collect();
    let mut noise = FixedNoise::new(draws);
    let (_, x_t) = load4("x_t.npy");
    let (_, eps) = load4("eps.npy");
    let (_, x0) = load4("x0_hat.npy");

    let mut den = TractDenoiser::load(&manifest, "s").unwrap();
    let mut run = Purification::start(&plan, images.view(), &mut noise).unwrap();
    // Float32 tolerance: the reference ran another engine with another summation order; the
    // error grows a little over 14 steps, so it is checked per step, not only at the end.
    let tol = 5e-5;
    let d = max_abs_diff(flat(run.state()), slice(&x_t, 0));
    assert!(d < 1e-5, "x_T* differs by {d}");
    for k in 1..=14 {
        run.step(&mut den, &mut noise).unwrap().unwrap();
        let de = max_abs_diff(flat(run.last_eps().unwrap()), slice(&eps, k - 1));
        let dx0 = max_abs_diff(flat(run.x0_estimate().unwrap()), slice(&x0, k - 1));
        let dx = max_abs_diff(flat(run.state()), slice(&x_t, k));
        eprintln!("step {k}: |eps| {de:.2e} |x0| {dx0:.2e} |x_t| {dx:.2e}");
        assert!(de < tol && dx0 < tol && dx < tol, "step {k}: eps {de}, x0 {dx0}, x_t {dx}");
    }
    let purified = run.current_image().unwrap();
    let (_, want) = load4("purified.npy");
    let d = max_abs_diff(flat(purified.view()), want.iter().map(|&v| v as f64));
    assert!(d < tol, "purified differs by {d}");

    let mut clf = TractClassifier::load(&manifest).unwrap();
    let logits = clf.logits(purified.view()).unwrap();
    let (_, want_logits) = load4("logits.npy");
    let d = max_abs_diff(logits.iter().map(|&v| v as f64), want_logits.iter().map(|&v| v as f64));
    assert!(d < 1e-3, "logits differ by {d}");
    let predicted: Vec<usize> = logits
        .outer_iter()
        .map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0)
        .collect();
    let want_pred: Vec<usize> = readme["predicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(predicted, want_pred);
}
