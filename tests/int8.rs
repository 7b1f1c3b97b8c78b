//! The int8 models (docs/int8.md): they load in tract, give finite outputs, agree with float32
//! within the tolerances below on calibration and held-out images, and the whole pipeline runs
//! in int8.

mod common;

use common::{models_dir, shared_data};
use diffshield::backend::tract::{TractClassifier, TractDenoiser};
use diffshield::config::{DefenseConfig, Precision};
use diffshield::data::cifar::read_cifar_bin;
use diffshield::manifest::Manifest;
use diffshield::noise::{NoiseSource, SeededNoise, StreamId};
use diffshield::pipeline::Pipeline;
use diffshield::{Classifier, Denoiser, Schedule};
use ndarray::{s, Array4, ArrayView4};
use std::path::PathBuf;

/// Relative L2 error of the int8 denoiser's eps against float32, at t in {10, 60, 140, 300}
/// (measured for denoiser_s with our int8 convs and per-channel weights: 0.19 / 0.053 / 0.031 /
/// 0.021 at t = 10 / 60 / 140 / 300, calibration and held-out alike, denoiser_m 0.18 / 0.043 /
/// 0.023 / 0.015; largest at small t, where eps moves the image least).
const EPS_REL_L2: f64 = 0.30;
/// RMS difference of the one-step x0 estimate, in [0,1] pixels (1/255 = 0.0039; measured:
/// 0.0036 / 0.0051 / 0.0071 / 0.0126 at the same t).
const X0_RMS: f64 = 0.03;
/// Relative L2 error of the int8 classifier's logits against float32 (measured: 0.011 on the
/// calibration images, 0.014 on 500 held-out ones).
const LOGIT_REL_L2: f64 = 0.10;
/// Share of images whose int8 top-1 label equals the float32 one (measured: 1.000 and 0.994).
const TOP1_AGREE: f64 = 0.97;

fn calib_images(n: usize) -> Array4<f32> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("calib/cifar10_calib_300.bin");
    read_cifar_bin(&path, Some(n)).unwrap().images
}

fn rel_l2(a: ArrayView4<f32>, b: ArrayView4<f32>) -> f64 {
    let num: f64 = a.iter().zip(b.iter()).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn noised(images: &Array4<f32>, t: u32) -> Array4<f32> {
    let abar = Schedule::ddpm_linear_1000().abar(t);
    let (a, b) = (abar.sqrt() as f32, (1.0 - abar).sqrt() as f32);
    let ids = (0..images.shape()[0]).map(|i| StreamId::of_frame(i as u64, 0)).collect();
    let mut noise = SeededNoise::new(7, ids);
    let mut x = images.mapv(|v| 2.0 * v - 1.0);
    let mut z = vec![0f32; 3 * 32 * 32];
    for (i, mut item) in x.outer_iter_mut().enumerate() {
        noise.fill(0, i, &mut z);
        for (v, z) in item.iter_mut().zip(&z) {
            *v = a * *v + b * z;
        }
    }
    x
}

fn denoisers(tier: &str) -> (TractDenoiser, TractDenoiser) {
    let m = Manifest::load(&models_dir()).unwrap();
    (
        TractDenoiser::load_with(&m, tier, Precision::F32).unwrap(),
        TractDenoiser::load_with(&m, tier, Precision::Int8).unwrap(),
    )
}

fn check_denoiser(tier: &str, images: &Array4<f32>, what: &str) {
    let (mut f, mut q) = denoisers(tier);
    let mut failures = Vec::new();
    for t in [10, 60, 140, 300] {
        let x = noised(images, t);
        let (e32, e8) = (f.predict_eps(x.view(), t).unwrap(), q.predict_eps(x.view(), t).unwrap());
        assert!(e8.iter().all(|v| v.is_finite()), "{what} t={t}: non-finite int8 eps");
        let r = rel_l2(e32.view(), e8.view());
        // the x0 estimate's difference, in [0,1] pixels: sqrt(1-abar)/sqrt(abar) * d_eps / 2
        let abar = Schedule::ddpm_linear_1000().abar(t);
        let k = (1.0 - abar).sqrt() / abar.sqrt() / 2.0;
        let mse: f64 =
            e32.iter().zip(e8.iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>()
                / e32.len() as f64;
        let x0_rms = k * mse.sqrt();
        eprintln!(
            "denoiser_{tier} int8 vs f32, {what}, t={t}: eps rel L2 {r:.4}, x0 estimate RMS {x0_rms:.4} px"
        );
        if r >= EPS_REL_L2 || x0_rms >= X0_RMS {
            failures.push(format!("t={t}: eps rel L2 {r:.4}, x0 RMS {x0_rms:.4}"));
        }
    }
    assert!(failures.is_empty(), "{tier} {what}: {failures:?} (limits {EPS_REL_L2}, {X0_RMS})");
}

fn check_classifier(images: &Array4<f32>, what: &str) {
    let m = Manifest::load(&models_dir()).unwrap();
    let mut f = TractClassifier::load_with(&m, Precision::F32).unwrap();
    let mut q = TractClassifier::load_with(&m, Precision::Int8).unwrap();
    let (l32, l8) = (f.logits(images.view()).unwrap(), q.logits(images.view()).unwrap());
    assert!(l8.iter().all(|v| v.is_finite()), "{what}: non-finite int8 logits");
    let n = images.shape()[0];
    let agree = (0..n)
        .filter(|&i| {
            let am = |r: ndarray::ArrayView1<f32>| diffshield::decision::argmax(r.iter().copied());
            am(l32.row(i)) == am(l8.row(i))
        })
        .count() as f64
        / n as f64;
    let r = rel_l2(
        l32.view().into_shape_with_order((n, 10, 1, 1)).unwrap(),
        l8.view().into_shape_with_order((n, 10, 1, 1)).unwrap(),
    );
    eprintln!("classifier int8 vs f32, {what} ({n} images): top-1 agreement {agree:.4}, logits rel L2 {r:.4}");
    assert!(agree >= TOP1_AGREE, "{what}: top-1 agreement {agree} < {TOP1_AGREE}");
    assert!(r < LOGIT_REL_L2, "{what}: logits rel L2 {r} >= {LOGIT_REL_L2}");
}

#[test]
fn int8_models_load_and_give_finite_outputs_at_any_batch() {
    let m = Manifest::load(&models_dir()).unwrap();
    let mut c = TractClassifier::load_with(&m, Precision::Int8).unwrap();
    let mut d = TractDenoiser::load_with(&m, "s", Precision::Int8).unwrap();
    let x = calib_images(11); // 11 > MAX_PLAN_BATCH: runs in two chunks
    let l = c.logits(x.view()).unwrap();
    assert_eq!(l.shape(), &[11, 10]);
    assert!(l.iter().all(|v| v.is_finite()));
    let x_t = noised(&x, 140);
    let e = d.predict_eps(x_t.view(), 140).unwrap();
    assert_eq!(e.shape(), x.shape());
    assert!(e.iter().all(|v| v.is_finite()));
    // A batch-1 call agrees with the same item inside the batch (separate plans per batch
    // size). Not to float rounding: tract's time-embedding matmul differs by ~1e-7 between
    // batch sizes, which can move a quantized conv input across a rounding boundary, and one
    // input step of the last conv moves eps by ~0.005 (0.0054 measured). A real batching bug
    // (another image's data, a stale buffer) moves eps by O(1).
    let one = d.predict_eps(x_t.slice(s![3..4, .., .., ..]), 140).unwrap();
    let diff = (&one.slice(s![0, .., .., ..]) - &e.slice(s![3, .., .., ..]))
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(diff < 0.03, "batch-1 and batched int8 eps differ by {diff}");
}

#[test]
fn int8_denoiser_agrees_with_f32_on_calibration_images() {
    check_denoiser("s", &calib_images(16), "calibration images");
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn int8_denoiser_agrees_with_f32_on_held_out_images() {
    let p = shared_data("cifar10_test_2000.bin");
    check_denoiser("s", &read_cifar_bin(&p, Some(16)).unwrap().images, "held-out test images");
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn int8_denoiser_m_agrees_with_f32_on_held_out_images() {
    let p = shared_data("cifar10_test_2000.bin");
    check_denoiser("m", &read_cifar_bin(&p, Some(16)).unwrap().images, "held-out test images");
}

#[test]
fn int8_classifier_agrees_with_f32_on_calibration_images() {
    check_classifier(&calib_images(300), "calibration images");
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn int8_classifier_agrees_with_f32_on_held_out_images() {
    let p = shared_data("cifar10_test_2000.bin");
    check_classifier(&read_cifar_bin(&p, Some(500)).unwrap().images, "held-out test images");
}

#[test]
fn the_pipeline_runs_end_to_end_in_int8() {
    let config = DefenseConfig {
        models: Some(models_dir()),
        seed: Some(0),
        precision: Precision::Int8,
        t_star: 60,
        stride: Some(20),
        votes: 2,
        ..DefenseConfig::default()
    };
    let x = calib_images(4);
    let mut p = Pipeline::from_config(&config).unwrap();
    let a = p.decide(x.view(), 0).unwrap();
    let b = Pipeline::from_config(&config).unwrap().decide(x.view(), 0).unwrap();
    assert_eq!(a.len(), 4);
    for (da, db) in a.iter().zip(&b) {
        assert!(da.label.is_some_and(|l| l < 10));
        assert!(da.probs.iter().all(|v| v.is_finite()));
        assert!((da.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert_eq!(da.label, db.label, "int8 decisions are reproducible");
        assert_eq!(da.probs, db.probs);
    }
}

#[test]
fn precision_is_a_config_key_and_a_missing_int8_file_is_refused() {
    let c: DefenseConfig = toml::from_str("precision = \"int8\"").unwrap();
    assert_eq!(c.precision, Precision::Int8);
    assert_eq!(DefenseConfig::default().precision, Precision::F32);
    assert!(toml::from_str::<DefenseConfig>("precision = \"int4\"").is_err());
    let dir = std::env::temp_dir().join(format!("diffshield-int8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = std::fs::read_to_string(models_dir().join("models.toml")).unwrap();
    let stripped: String =
        toml.lines().filter(|l| !l.starts_with("int8_file")).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("models.toml"), stripped).unwrap();
    let m = Manifest::load(&dir).unwrap();
    let err = TractClassifier::load_with(&m, Precision::Int8).err().expect("refused").to_string();
    assert!(err.contains("int8_file"), "{err}");
    let err =
        TractDenoiser::load_with(&m, "s", Precision::Int8).err().expect("refused").to_string();
    assert!(err.contains("int8_file") && err.contains("denoiser s"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
