//! The purified training set: what it holds, that a killed run resumes to the same bytes, and
//! that a folder made with other settings is refused instead of mixed.

mod common;

use common::{models_dir, scratch, synthetic_cifar};
use diffshield::data::CIFAR_RECORD_BYTES;
use diffshield::noise::NoiseDomain;
use diffshield::pipeline::Pipeline;
use diffshield::purified_set::{purify_set, read_shard, PurifiedSetSpec};
use diffshield::DefenseConfig;

fn spec(source: &std::path::Path, out: &std::path::Path, seed: Option<u64>) -> PurifiedSetSpec {
    let mut defense =
        DefenseConfig { t_star: 20, stride: None, steps: Some(2), ..Default::default() };
    defense.models = Some(models_dir());
    defense.seed = seed;
    defense.batch = 3;
    PurifiedSetSpec {
        source: source.into(),
        limit: Some(5),
        out: out.into(),
        draws: 2,
        shard_images: 4,
        defense,
    }
}

fn run(spec: &PurifiedSetSpec) -> (diffshield::purified_set::PurifiedSetManifest, Vec<bool>) {
    let mut kept = Vec::new();
    let m = purify_set(spec, &mut |s| kept.push(s.kept)).expect("purifies");
    (m, kept)
}

#[test]
fn shards_hold_every_draw_of_every_image_and_a_resumed_run_gives_the_same_bytes() {
    let d = scratch("purified-set");
    let source = synthetic_cifar(&d, "train.bin", 7, 1);
    let out = d.join("set");
    let (m, kept) = run(&spec(&source, &out, None));
    assert_eq!((m.images, m.draws, m.shards()), (5, 2, 2));
    assert_eq!(kept, [false, false]);
    let shard0 = std::fs::read(out.join("shard_00000.bin")).unwrap();
    let shard1 = std::fs::read(out.join("shard_00001.bin")).unwrap();
    assert_eq!(shard0.len(), 4 * 2 * CIFAR_RECORD_BYTES);
    assert_eq!(shard1.len(), 2 * CIFAR_RECORD_BYTES);
    // Image-major: image i's draws sit together, with its label (synthetic labels are i % 10).
    let s0 = read_shard(&out, 0).unwrap();
    assert_eq!(s0.labels, [0, 0, 1, 1, 2, 2, 3, 3]);
    assert_eq!(read_shard(&out, 1).unwrap().labels, [4, 4]);
    // Two draws of one image differ (own noise); they are purified images, not the input.
    let diff = (&s0.images.slice(ndarray::s![0, .., .., ..])
        - &s0.images.slice(ndarray::s![1, .., .., ..]))
        .mapv(f32::abs)
        .sum();
    assert!(diff > 1.0, "draws of one image are identical");

    // The bytes are the deployed pipeline's purifications in the training-set noise domain.
    let mut config = spec(&source, &out, Some(m.seed)).defense;
    config.votes = 2;
    let mut pipeline = Pipeline::from_config(&config).unwrap();
    let set = diffshield::data::read_cifar_bin(&source, Some(3)).unwrap();
    let purified =
        pipeline.purify_votes_in(set.images.view(), NoiseDomain::TrainingSet, 0).unwrap();
    let expected: Vec<u8> =
        purified.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let got: Vec<u8> =
        shard0.chunks(CIFAR_RECORD_BYTES).take(6).flat_map(|r| r[1..].to_vec()).collect();
    assert_eq!(got, expected);

    // A lost shard (killed run) is redone with the manifest's seed, byte for byte; the other kept.
    std::fs::remove_file(out.join("shard_00000.bin")).unwrap();
    std::fs::write(out.join("shard_00001.bin"), &shard1[..100]).unwrap();
    let (again, kept) = run(&spec(&source, &out, None));
    assert_eq!(again.seed, m.seed);
    assert_eq!(kept, [false, false]);
    assert_eq!(std::fs::read(out.join("shard_00000.bin")).unwrap(), shard0);
    assert_eq!(std::fs::read(out.join("shard_00001.bin")).unwrap(), shard1);
    let (_, kept) = run(&spec(&source, &out, Some(m.seed)));
    assert_eq!(kept, [true, true]);
}

#[test]
fn a_folder_made_with_other_settings_or_seed_is_refused() {
    let d = scratch("purified-set-mismatch");
    let source = synthetic_cifar(&d, "train.bin", 5, 2);
    let out = d.join("set");
    let mut s = spec(&source, &out, Some(11));
    s.limit = Some(2);
    run(&s);
    let refused = |s: &PurifiedSetSpec, field: &str| {
        let e = purify_set(s, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains("another folder"), "{field}: {e}");
    };
    let mut draws = s.clone();
    draws.draws = 3;
    refused(&draws, "draws");
    let mut seed = s.clone();
    seed.defense.seed = Some(12);
    refused(&seed, "seed");
    let mut plan = s.clone();
    plan.defense.steps = Some(3);
    refused(&plan, "timesteps");
    synthetic_cifar(&d, "train.bin", 5, 3);
    refused(&s, "source_sha256");
    let mut bad = s.clone();
    bad.draws = 0;
    assert!(purify_set(&bad, &mut |_| {}).unwrap_err().to_string().contains("draws"));
    let mut bad = s.clone();
    bad.shard_images = 0;
    assert!(purify_set(&bad, &mut |_| {}).unwrap_err().to_string().contains("shard"));
}

#[test]
fn the_command_line_refuses_votes_and_budgets_and_names_a_bad_source() {
    let d = scratch("purified-set-cli");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_diffshield"))
            .arg("purify-set")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("binary runs")
    };
    let out = d.join("o");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--data", "samples", "--out", o, "--votes", "3"], "--votes"),
        (vec!["--data", "samples", "--out", o, "--budget-ms", "50"], "--budget-ms"),
        (vec!["--data", "samples", "--out", o], "samples"),
    ] {
        let r = run(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{needle}: {err}");
    }
}
