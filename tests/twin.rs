//! The differentiable twin of the shipped networks (feature `twin`): it computes what the
//! deployed tract models compute, its gradients pass the finite-difference checks, it follows a
//! model with other weights in the same graph and refuses any other, and a fixed-seed white-box
//! attack is reproducible.
#![cfg(feature = "twin")]

mod common;

use common::models_dir;
use diffshield::attack::gradients::{EotNoise, WhiteBoxGradient};
use diffshield::attack::pgd::{distances, pgd, PgdConfig};
use diffshield::attack::ThreatModel;
use diffshield::backend::tract::{TractClassifier, TractDenoiser};
use diffshield::backend::{Classifier, Denoiser};
use diffshield::data::image::load_image;
use diffshield::grad::burn_twin::{TwinClassifier, TwinDenoiser};
use diffshield::grad::check::standard_checks;
use diffshield::grad::Loss;
use diffshield::manifest::Manifest;
use diffshield::schedule::{DdimPlan, PlanSpec};
use ndarray::Array4;

fn samples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples")
}

fn images(n: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, 32, 32), |(i, c, h, w)| {
        0.5 + 0.4 * ((i as f32 + 1.0) * 0.3 * h as f32 + 0.2 * w as f32 + c as f32).sin()
    })
}

fn manifest() -> Manifest {
    Manifest::load(&models_dir()).unwrap()
}

fn plan(m: &Manifest, t_star: u32, stride: u32) -> DdimPlan {
    let schedule = m.schedule().unwrap();
    DdimPlan::new(
        &schedule,
        m.denoiser("s").unwrap().trained_range(),
        t_star,
        &PlanSpec::Stride(stride),
        1.0,
    )
    .unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn the_twin_computes_what_the_deployed_models_compute() {
    let m = manifest();
    let x = images(2);
    let mut twin = TwinClassifier::load(&m).unwrap();
    let mut deployed = TractClassifier::load(&m).unwrap();
    let (a, b) = (twin.logits(x.view()).unwrap(), deployed.logits(x.view()).unwrap());
    let d = max_abs(a.as_slice().unwrap(), b.as_slice().unwrap());
    assert!(d < 1e-3, "classifier logits differ by {d}");
    for tier in ["s", "m"] {
        let mut twin = TwinDenoiser::load(&m, tier).unwrap();
        let mut deployed = TractDenoiser::load(&m, tier).unwrap();
        let x_t = x.mapv(|p| 2.0 * p - 1.0);
        let (a, b) = (
            twin.predict_eps(x_t.view(), 140).unwrap(),
            deployed.predict_eps(x_t.view(), 140).unwrap(),
        );
        let d = max_abs(a.as_slice().unwrap(), b.as_slice().unwrap());
        assert!(d < 1e-4, "denoiser {tier} eps differs by {d}");
    }
}

/// The gradients against central differences on a shipped sample image (h = 1e-3, 16
/// coordinates each, half of them the largest entries). Tolerances, relative error with a floor
/// of 5 % of the largest entry: median 1 % for all three; largest 5 % for the smooth denoiser and
/// purifier, 25 % for the ReLU/max-pool classifier, whose small entries see kinks too weak for the
/// one-sided-slope test (measured on this image: median 0.9 %, largest entries within 0.1-1.9 %,
/// worst small entry 16 %).
#[test]
fn gradients_pass_the_finite_difference_checks() {
    let m = manifest();
    let p = plan(&m, 60, 20);
    let mut d = TwinDenoiser::load(&m, "s").unwrap();
    let mut c = TwinClassifier::load(&m).unwrap();
    let dog = load_image(&samples_dir().join("00_dog.png"), (32, 32)).unwrap();
    let x = dog.insert_axis(ndarray::Axis(0));
    let checks = standard_checks(&p, &mut d, &mut c, x.view(), &[5], 16, 1e-3, 5).unwrap();
    assert_eq!(checks.len(), 3);
    for chk in &checks {
        let max = if chk.name == "classifier" { 0.25 } else { 0.05 };
        assert!(chk.check.median_rel_error < 0.01, "{}: {:?}", chk.name, chk.check);
        assert!(chk.check.max_rel_error < max, "{}: {:?}", chk.name, chk.check);
        assert!(chk.replay_error < 1e-5, "{}: replay error {}", chk.name, chk.replay_error);
    }
}

#[test]
fn a_model_the_twin_was_not_generated_from_is_refused() {
    let dir = std::env::temp_dir().join(format!("diffshield-twin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["models.toml", "denoiser_s.onnx", "denoiser_m.onnx"] {
        std::fs::copy(models_dir().join(f), dir.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(models_dir().join("classifier.onnx")).unwrap();
    bytes.push(0);
    std::fs::write(dir.join("classifier.onnx"), bytes).unwrap();
    let m = Manifest::load(&dir).unwrap();
    let err = TwinClassifier::load(&m).err().expect("a changed file must be refused");
    assert!(err.to_string().contains("no differentiable twin"), "{err}");
    assert!(TwinDenoiser::load(&m, "s").is_ok(), "unchanged denoiser still loads");
    std::fs::remove_dir_all(&dir).ok();
}

/// A retrained or fine-tuned classifier from the same export (same graph, other weights) needs
/// no rebuild: its twin reads the new weights and computes the new model.
#[test]
fn a_model_with_other_weights_in_the_same_graph_gets_a_twin_that_computes_it() {
    use tract_onnx::prelude::Framework as _;
    let d = common::scratch("twin-other-weights");
    let models = common::models_copy(&d, "models", |m| m);
    let path = models_dir().join("classifier.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    let proto = tract_onnx::onnx().proto_model_for_path(&path).unwrap();
    let graph = proto.graph.as_ref().unwrap();
    for name in ["net.6.0.bias", "net.0.0.weight"] {
        let raw = &graph.initializer.iter().find(|t| t.name == name).unwrap().raw_data;
        let at = bytes.windows(raw.len()).position(|w| w == &raw[..]).expect("raw data in file");
        let changed: Vec<u8> = raw
            .chunks(4)
            .flat_map(|c| (0.1 - 1.5 * f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        bytes[at..at + raw.len()].copy_from_slice(&changed);
    }
    std::fs::remove_file(models.join("classifier.onnx")).unwrap();
    std::fs::write(models.join("classifier.onnx"), &bytes).unwrap();
    let m = Manifest::load(&models).unwrap();
    let x = images(2);
    let mut twin = TwinClassifier::load(&m).expect("same graph, other weights: a twin");
    let mut deployed = TractClassifier::load(&m).unwrap();
    let mut original = TractClassifier::load(&manifest()).unwrap();
    let (a, b) = (twin.logits(x.view()).unwrap(), deployed.logits(x.view()).unwrap());
    let o = original.logits(x.view()).unwrap();
    let d = max_abs(a.as_slice().unwrap(), b.as_slice().unwrap());
    let moved = max_abs(b.as_slice().unwrap(), o.as_slice().unwrap());
    assert!(moved > 0.05, "the edit did not change the model ({moved})");
    assert!(d < 1e-3 * (1.0 + moved), "twin and deployed logits differ by {d}");
    // One op changed (op_type field "Relu" -> "Tanh", same length): another graph, refused.
    let op = [0x22, 4, b'R', b'e', b'l', b'u'];
    let at = bytes.windows(6).position(|w| w == op).expect("a Relu node");
    bytes[at + 2..at + 6].copy_from_slice(b"Tanh");
    std::fs::remove_file(models.join("classifier.onnx")).unwrap();
    std::fs::write(models.join("classifier.onnx"), &bytes).unwrap();
    let m = Manifest::load(&models).unwrap();
    let err = TwinClassifier::load(&m).err().expect("another graph is refused");
    assert!(err.to_string().contains("graph differs"), "{err}");
}

#[test]
fn a_fixed_seed_white_box_run_is_reproducible_and_stays_in_the_ball() {
    let m = manifest();
    let p = plan(&m, 40, 20);
    let x = images(2);
    let labels = [1usize, 6];
    let threat: ThreatModel = "linf:8/255".parse().unwrap();
    let cfg = PgdConfig { threat, steps: 2, step_size: 2.0 / 255.0, random_start: true, seed: 3 };
    let run = || {
        let mut d = TwinDenoiser::load(&m, "s").unwrap();
        let mut c = TwinClassifier::load(&m).unwrap();
        let mut g = WhiteBoxGradient {
            plan: &p,
            denoiser: &mut d,
            classifier: &mut c,
            noise: EotNoise { seed: 9, eot: 2, first_frame: 100, cell: 1, attack: 0, known: false },
            loss: Loss::CrossEntropy,
            replay_error: 0.0,
        };
        let adv = pgd(&mut g, x.view(), &labels, &cfg).unwrap();
        assert!(g.replay_error < 1e-5, "replay error {}", g.replay_error);
        adv
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b, "same seeds, same adversarial images");
    assert_ne!(a, x, "the attack moved the images");
    for dist in distances(a.view(), x.view(), threat.norm) {
        assert!(dist <= threat.eps + 1e-6, "{dist}");
    }
    assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
}

/// APGD-CE (100 steps) on the bare classifier is at least as strong as PGD-20 on the same
/// images: the check that the new attack is not weaker than the old one.
#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn apgd_ce_is_at_least_as_strong_as_pgd_20_on_the_bare_classifier() {
    use diffshield::attack::apgd::apgd;
    use diffshield::attack::gradients::ClassifierGradient;
    let set = diffshield::data::cifar::read_cifar_bin(
        &common::shared_data("cifar10_test_2000.bin"),
        Some(12),
    )
    .unwrap();
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let m = manifest();
    let mut twin = TwinClassifier::load(&m).unwrap();
    let mut deployed = TractClassifier::load(&m).unwrap();
    let threat: ThreatModel = "linf:4/255".parse().unwrap();
    let accuracy = |x: &Array4<f32>, c: &mut TractClassifier| {
        let logits = c.logits(x.view()).unwrap();
        logits
            .outer_iter()
            .zip(&labels)
            .filter(|(r, &l)| {
                r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 == l
            })
            .count()
    };
    let cfg = PgdConfig { threat, steps: 20, step_size: 1.0 / 255.0, random_start: true, seed: 1 };
    let mut g = ClassifierGradient { classifier: &mut twin, loss: Loss::CrossEntropy };
    let by_pgd = pgd(&mut g, set.images.view(), &labels, &cfg).unwrap();
    let by_apgd = apgd(&mut g, set.images.view(), &labels, threat, 100).unwrap();
    for d in distances(by_apgd.view(), set.images.view(), threat.norm) {
        assert!(d <= threat.eps + 1e-6, "APGD left the ball: {d}");
    }
    let (pgd_ok, apgd_ok) = (accuracy(&by_pgd, &mut deployed), accuracy(&by_apgd, &mut deployed));
    eprintln!("robust of 12 at linf 4/255: PGD-20 {pgd_ok}, APGD-CE-100 {apgd_ok}");
    assert!(apgd_ok <= pgd_ok, "APGD-CE {apgd_ok} correct vs PGD-20 {pgd_ok}");
}

/// The twins on burn's `wgpu` backend (Mesa's lavapipe in CI) compute the flex twins' outputs
/// and input gradients, alone and chained through a DDIM step with the forward noise replayed.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_twins_agree_with_the_flex_twins() {
    use diffshield::attack::pgd::LossGradient;
    use diffshield::grad::{DifferentiableClassifier, DifferentiableDenoiser, GradDevice};
    let m = manifest();
    let on = |d| -> (TwinClassifier, TwinDenoiser) {
        let c = TwinClassifier::load_on(&m, d).unwrap_or_else(|e| {
            panic!("{e} (CI installs mesa-vulkan-drivers; VK_ICD_FILENAMES picks lavapipe)")
        });
        (c, TwinDenoiser::load_on(&m, "s", d).unwrap())
    };
    let (mut cpu_c, mut cpu_d) = on(GradDevice::Cpu);
    let (mut gpu_c, mut gpu_d) = on(GradDevice::Wgpu);
    let rel = |a: &[f32], b: &[f32]| {
        let scale = a.iter().fold(0.0f32, |s, v| s.max(v.abs())).max(1e-12);
        max_abs(a, b) / scale
    };
    let x = images(1);
    let ones = |l: ndarray::ArrayView2<f32>| Ok(ndarray::Array2::ones(l.raw_dim()));
    let (l1, g1) = cpu_c.logits_vjp(x.view(), &mut |l| ones(l)).unwrap();
    let (l2, g2) = gpu_c.logits_vjp(x.view(), &mut |l| ones(l)).unwrap();
    let (dl, dg) = (
        rel(l1.as_slice().unwrap(), l2.as_slice().unwrap()),
        rel(g1.as_slice().unwrap(), g2.as_slice().unwrap()),
    );
    assert!(dl < 1e-4 && dg < 1e-3, "classifier: logits {dl:e}, gradient {dg:e}");
    let cot = Array4::<f32>::ones(x.raw_dim());
    let (e1, h1) = cpu_d.eps_vjp(x.view(), 100, cot.view()).unwrap();
    let (e2, h2) = gpu_d.eps_vjp(x.view(), 100, cot.view()).unwrap();
    let (de, dh) = (
        rel(e1.as_slice().unwrap(), e2.as_slice().unwrap()),
        rel(h1.as_slice().unwrap(), h2.as_slice().unwrap()),
    );
    assert!(de < 1e-4 && dh < 1e-3, "denoiser: eps {de:e}, gradient {dh:e}");
    let p = plan(&m, 40, 20);
    let noise = EotNoise { seed: 3, eot: 1, first_frame: 0, cell: 1, attack: 0, known: false };
    let grad = |c: &mut TwinClassifier, d: &mut TwinDenoiser| {
        let mut g = WhiteBoxGradient {
            plan: &p,
            denoiser: d,
            classifier: c,
            noise,
            loss: Loss::CrossEntropy,
            replay_error: 0.0,
        };
        let out = g.loss_values_and_grad(x.view(), &[3], 0).unwrap();
        (out, g.replay_error)
    };
    let ((v1, w1), r1) = grad(&mut cpu_c, &mut cpu_d);
    let ((v2, w2), r2) = grad(&mut gpu_c, &mut gpu_d);
    let dw = rel(w1.as_slice().unwrap(), w2.as_slice().unwrap());
    assert!((v1[0] - v2[0]).abs() < 1e-3 * v1[0].abs().max(1.0), "loss {} vs {}", v1[0], v2[0]);
    assert!(dw < 1e-3, "white-box gradient through 2 DDIM steps: {dw:e}");
    assert!(r1 < 1e-4 && r2 < 1e-4, "forward replay errors {r1:e} (flex), {r2:e} (wgpu)");
    eprintln!("wgpu vs flex: classifier {dl:e}/{dg:e}, denoiser {de:e}/{dh:e}, white-box {dw:e}");
}
