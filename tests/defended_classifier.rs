//! A manifest's `[defended_classifier]`: the defended pipeline (and the attacks on it) run it,
//! the undefended mode keeps `[classifier]`, and a bad entry is named.

mod common;

use common::{models_dir, scratch};
use diffshield::backend::tract::TractClassifier;
use diffshield::backend::Classifier;
use diffshield::manifest::{ClassifierRole, Manifest};
use diffshield::pipeline::Pipeline;
use diffshield::DefenseConfig;
use ndarray::Array4;
use tract_onnx::prelude::Framework as _;

/// The shipped classifier with its last layer's weights negated: the same graph (so the twin
/// follows it), the opposite ranking of the classes.
fn negated_classifier() -> Vec<u8> {
    let path = models_dir().join("classifier.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    let proto = tract_onnx::onnx().proto_model_for_path(&path).unwrap();
    let graph = proto.graph.as_ref().unwrap();
    let matmul = graph.node.iter().find(|n| n.op_type == "MatMul").expect("the linear layer");
    let w = graph.initializer.iter().find(|t| matmul.input.contains(&t.name)).unwrap();
    let raw = &w.raw_data;
    let at = bytes.windows(raw.len()).position(|x| x == &raw[..]).unwrap();
    for c in bytes[at..at + raw.len()].chunks_mut(4) {
        c[3] ^= 0x80;
    }
    bytes
}

fn models_with_defended(dir: &std::path::Path) -> std::path::PathBuf {
    let models = common::models_copy(dir, "models", |m| {
        m + "\n[defended_classifier]\nfile = \"classifier_defended.onnx\"\n"
    });
    std::fs::write(models.join("classifier_defended.onnx"), negated_classifier()).unwrap();
    models
}

fn images(n: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, 32, 32), |(i, c, h, w)| {
        0.5 + 0.4 * ((i as f32 + 1.0) * 0.37 * h as f32 + 0.23 * w as f32 + c as f32).sin()
    })
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

#[test]
fn the_defended_pipeline_runs_the_defended_classifier_and_the_undefended_mode_the_bare_one() {
    let d = scratch("defended-classifier");
    let models = models_with_defended(&d);
    let m = Manifest::load(&models).unwrap();
    assert!(m.has_defended_classifier());
    assert_eq!(m.classifier_entry(ClassifierRole::Bare).file, "classifier.onnx");
    assert_eq!(m.classifier_entry(ClassifierRole::Defended).file, "classifier_defended.onnx");
    let x = images(6);
    let bare = TractClassifier::load(&m).unwrap().logits(x.view()).unwrap();
    let engine = Default::default();
    let defended =
        TractClassifier::load_role(&m, ClassifierRole::Defended, Default::default(), &engine)
            .unwrap()
            .logits(x.view())
            .unwrap();
    // Negated last layer: each one's top class is the other's bottom class.
    for (b, n) in bare.outer_iter().zip(defended.outer_iter()) {
        assert!(b.iter().zip(n).all(|(p, q)| (p + q).abs() < 1e-4));
    }
    let config = DefenseConfig {
        models: Some(models.clone()),
        t_star: 1,
        stride: None,
        steps: Some(1),
        votes: 1,
        seed: Some(4),
        ..Default::default()
    };
    let mut pipeline = Pipeline::from_config(&config).unwrap();
    let undefended = pipeline.decide_undefended(x.view(), 0).unwrap();
    for (dec, row) in undefended.iter().zip(bare.outer_iter()) {
        assert_eq!(dec.label, Some(argmax(row)), "undefended mode runs [classifier]");
    }
    // At T* = 1 the purified image is the input to about 0.005: the defended decisions are
    // the defended classifier's own on the input (whose top class is the bare one's bottom).
    let defended_decisions = pipeline.decide(x.view(), 0).unwrap();
    let agree = |logits: &ndarray::Array2<f32>| {
        defended_decisions
            .iter()
            .zip(logits.outer_iter())
            .filter(|(dec, row)| dec.label == Some(argmax(*row)))
            .count()
    };
    assert!(agree(&defended) >= 5, "defended pipeline runs [defended_classifier]");
    assert_eq!(agree(&bare), 0);
}

#[cfg(feature = "twin")]
#[test]
fn the_attack_twins_follow_the_roles_and_the_report_fingerprints_both_files() {
    use diffshield::grad::burn_twin::TwinClassifier;
    let d = scratch("defended-classifier-twin");
    let models = models_with_defended(&d);
    let m = Manifest::load(&models).unwrap();
    let x = images(2);
    let mut defended_twin =
        TwinClassifier::load_role(&m, ClassifierRole::Defended, Default::default()).unwrap();
    let mut bare_twin =
        TwinClassifier::load_role(&m, ClassifierRole::Bare, Default::default()).unwrap();
    let (a, b) = (defended_twin.logits(x.view()).unwrap(), bare_twin.logits(x.view()).unwrap());
    assert!(a.iter().zip(&b).all(|(p, q)| (p + q).abs() < 1e-3), "twins are the two files");

    let data = common::synthetic_cifar(&d, "d.bin", 2, 5);
    let report = d.join("r.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffshield"))
        .args(["attack", "--models", models.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--limit", "2", "--threat", "linf:8/255", "--mode", "undefended,grey-box"])
        .args(["--pgd-steps", "2", "--runs", "1", "--t-star", "20", "--steps", "2", "--votes", "1"])
        .args(["--out", report.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let f = &v["fingerprints"];
    assert!(f["classifier"].as_str().unwrap().starts_with("sha256:"), "{f}");
    assert!(f["defended_classifier"].as_str().unwrap().starts_with("sha256:"), "{f}");
    assert_ne!(f["classifier"], f["defended_classifier"]);
}

#[test]
fn a_defended_classifier_entry_is_checked_like_the_others() {
    let d = scratch("defended-classifier-bad");
    let outside = common::models_copy(&d, "outside", |m| {
        m + "\n[defended_classifier]\nfile = \"../classifier.onnx\"\n"
    });
    let e = Manifest::load(&outside).unwrap_err().to_string();
    assert!(e.contains("defended_classifier file"), "{e}");
    let missing = common::models_copy(&d, "missing", |m| {
        m + "\n[defended_classifier]\nfile = \"nope.onnx\"\n"
    });
    let config = DefenseConfig { models: Some(missing), seed: Some(1), ..Default::default() };
    let e = Pipeline::from_config(&config).err().expect("missing file").to_string();
    assert!(e.contains("nope.onnx"), "{e}");
    let typo = common::models_copy(&d, "typo", |m| {
        m + "\n[defended_classifier]\nfile = \"classifier.onnx\"\nfiles = 1\n"
    });
    assert!(Manifest::load(&typo).unwrap_err().to_string().contains("files"));
}
