//! Accuracy against the model card's reference figures, on ../shared/data (ignored, with the
//! reason, where it was absent at build time). These are the slowest tests (about two minutes on two cores).

mod common;

use common::{models_dir, shared_data};
use diffshield::config::DefenseConfig;
use diffshield::data::cifar::read_cifar_bin;
use diffshield::pipeline::Pipeline;
use ndarray::Axis;

fn accuracy(pipeline: &mut Pipeline, n: usize, batch: usize, purify: bool) -> f64 {
    let path = shared_data("cifar10_test_2000.bin");
    let set = read_cifar_bin(&path, Some(n)).unwrap();
    assert_eq!(set.labels.len(), n);
    let mut correct = 0;
    for (b, chunk) in set.images.axis_chunks_iter(Axis(0), batch).enumerate() {
        let first = (b * batch) as u64;
        let d = if purify {
            pipeline.decide(chunk, first).unwrap()
        } else {
            pipeline.decide_undefended(chunk, first).unwrap()
        };
        correct += d
            .iter()
            .zip(&set.labels[b * batch..])
            .filter(|(d, &l)| d.label == Some(l as usize))
            .count();
    }
    correct as f64 / n as f64
}

fn pipeline() -> Pipeline {
    let config = DefenseConfig {
        models: Some(models_dir()),
        threads: 2,
        seed: Some(0),
        votes: 1,
        ..DefenseConfig::default()
    };
    Pipeline::from_config(&config).unwrap()
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn classifier_alone_matches_model_card_on_2000_images() {
    let acc = accuracy(&mut pipeline(), 2000, 100, false);
    eprintln!("clean accuracy on 2000: {:.2} %", acc * 100.0);
    // MODEL_CARD: 91.70 % on the full 10 000; the issue fixes +-0.5 points on these 2000.
    assert!((acc - 0.917).abs() <= 0.005, "clean accuracy {acc}");
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn defended_accuracy_matches_model_card_on_500_images() {
    // denoiser_s, T*=140, stride 10, eta 1 (the defaults). The card's fp32 CPU figure on the
    // same first 500 images is 65.8 %, with run-to-run noise of about 2 points at 500 images.
    let acc = accuracy(&mut pipeline(), 500, 1, true);
    eprintln!("purified accuracy on 500: {:.2} %", acc * 100.0);
    assert!((acc - 0.658).abs() <= 0.04, "purified accuracy {acc}");
}
