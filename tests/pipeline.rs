//! The pipeline on the shipped models: votes, determinism, bad pixels.

mod common;

use common::models_dir;
use diffshield::config::{DefenseConfig, VoteRule};
use diffshield::pipeline::Pipeline;
use diffshield::Error;
use ndarray::Array4;

fn pipeline(votes: u32, rule: VoteRule, seed: u64) -> Pipeline {
    let config = DefenseConfig {
        models: Some(models_dir()),
        votes,
        vote_rule: rule,
        seed: Some(seed),
        t_star: 60,
        stride: Some(20),
        ..DefenseConfig::default()
    };
    Pipeline::from_config(&config).unwrap()
}

fn frames(n: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, 32, 32), |(i, c, h, w)| {
        ((i * 7 + c * 3 + h + 2 * w) % 17) as f32 / 16.0
    })
}

#[test]
fn nan_and_out_of_range_pixels_are_refused_with_their_position() {
    let mut p = pipeline(1, VoteRule::Majority, 0);
    let mut x = frames(2);
    x[[1, 2, 5, 6]] = f32::NAN;
    let err = p.decide(x.view(), 0).unwrap_err();
    assert!(matches!(err, Error::Pixels { .. }), "{err}");
    assert!(err.to_string().contains("non-finite value NaN at image 1"), "{err}");
    let err = p.decide_undefended(x.view(), 0).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let mut y = frames(1);
    y[[0, 0, 0, 0]] = 1.5;
    let err = p.decide(y.view(), 0).unwrap_err();
    assert!(err.to_string().contains("outside [0,1]"), "{err}");
}

#[test]
fn wrong_image_size_is_a_shape_error() {
    let mut p = pipeline(1, VoteRule::Majority, 0);
    let x = Array4::<f32>::zeros((1, 3, 16, 16));
    let err = p.decide(x.view(), 0).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}

#[test]
fn votes_are_batched_independent_purifications() {
    let x = frames(2);
    let mut p = pipeline(3, VoteRule::Majority, 11);
    let purified = p.purify_votes(x.view(), 5).unwrap();
    assert_eq!(purified.shape(), &[6, 3, 32, 32]);
    // Votes of one frame differ (independent noise) ...
    assert_ne!(
        purified.slice(ndarray::s![0, .., .., ..]),
        purified.slice(ndarray::s![1, .., .., ..])
    );
    // ... and each vote equals a one-vote run of that frame with the same stream id: a frame's
    // result does not depend on what else shares its batch.
    let mut single = pipeline(3, VoteRule::Majority, 11);
    let alone = single.purify_votes(x.slice(ndarray::s![1..2, .., .., ..]), 6).unwrap();
    assert_eq!(alone, purified.slice(ndarray::s![3..6, .., .., ..]));
    let d = p.decide(x.view(), 5).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[1].frame, 6);
    assert_eq!(d[0].vote_labels.len(), 3);
    let count = |l| d[0].vote_labels.iter().filter(|&&v| v == l).count();
    assert!(d[0]
        .vote_labels
        .iter()
        .all(|&l| d[0].label.is_some_and(|label| count(label) >= count(l))));
}

#[test]
fn same_seed_same_decision_other_seed_other_noise() {
    let x = frames(1);
    let a = pipeline(1, VoteRule::MeanProb, 1).purify_votes(x.view(), 0).unwrap();
    let b = pipeline(1, VoteRule::MeanProb, 1).purify_votes(x.view(), 0).unwrap();
    let c = pipeline(1, VoteRule::MeanProb, 2).purify_votes(x.view(), 0).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let da = pipeline(2, VoteRule::MeanProb, 1).decide(x.view(), 0).unwrap();
    let db = pipeline(2, VoteRule::MeanProb, 1).decide(x.view(), 0).unwrap();
    assert_eq!((da[0].label, &da[0].probs), (db[0].label, &db[0].probs));
}

#[test]
fn batches_larger_than_one_plan_run_in_chunks_with_the_same_results() {
    use diffshield::backend::tract::{TractClassifier, TractDenoiser, MAX_PLAN_BATCH};
    use diffshield::manifest::Manifest;
    use diffshield::{Classifier, Denoiser};
    let manifest = Manifest::load(&models_dir()).unwrap();
    let n = MAX_PLAN_BATCH + 3;
    let x = frames(n);
    let mut clf = TractClassifier::load(&manifest).unwrap();
    let all = clf.logits(x.view()).unwrap();
    assert_eq!(all.shape(), &[n, 10]);
    let mut den = TractDenoiser::load(&manifest, "s").unwrap();
    let x_t = x.mapv(|v| 2.0 * v - 1.0);
    let eps = den.predict_eps(x_t.view(), 50).unwrap();
    for i in [0, MAX_PLAN_BATCH - 1, MAX_PLAN_BATCH, n - 1] {
        let one = x.slice(ndarray::s![i..i + 1, .., .., ..]);
        let d = (&clf.logits(one).unwrap().row(0) - &all.row(i)).mapv(f32::abs);
        assert!(d.iter().all(|&v| v < 1e-4), "classifier row {i} differs by {d}");
        let one_t = x_t.slice(ndarray::s![i..i + 1, .., .., ..]);
        let e = den.predict_eps(one_t, 50).unwrap();
        let d = (&e.slice(ndarray::s![0, .., .., ..]) - &eps.slice(ndarray::s![i, .., .., ..]))
            .mapv(f32::abs)
            .fold(0f32, |m, &v| m.max(v));
        assert!(d < 1e-4, "denoiser item {i} differs by {d}");
    }
}

/// The kernels split each op over the pipeline's threads so that every value is computed by
/// one thread in a fixed order: any thread count gives the same bits, f32 and int8, both
/// denoisers, at batch 1 and at a batch that leaves partial work items.
#[test]
fn thread_counts_give_bit_identical_results() {
    use diffshield::config::Precision;
    for (denoiser, precision) in
        [("s", Precision::F32), ("m", Precision::F32), ("s", Precision::Int8)]
    {
        let run = |threads: usize, n: usize| {
            let config = DefenseConfig {
                models: Some(models_dir()),
                denoiser: denoiser.into(),
                precision,
                threads,
                votes: 1,
                seed: Some(5),
                t_star: 40,
                stride: Some(20),
                ..DefenseConfig::default()
            };
            let mut p = Pipeline::from_config(&config).unwrap();
            let x = frames(n);
            let purified = p.purify_votes(x.view(), 0).unwrap();
            let probs: Vec<Vec<f32>> =
                p.decide(x.view(), 0).unwrap().into_iter().map(|d| d.probs).collect();
            let undefended: Vec<Vec<f32>> =
                p.decide_undefended(x.view(), 0).unwrap().into_iter().map(|d| d.probs).collect();
            (purified.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), probs, undefended)
        };
        for n in [1, 3] {
            let one = run(1, n);
            for threads in [2, 3] {
                let other = run(threads, n);
                let case = format!("denoiser {denoiser} {precision:?} batch {n} threads {threads}");
                assert!(one.0 == other.0, "{case}: purified images differ");
                assert_eq!(one.1, other.1, "{case}: defended probabilities");
                assert_eq!(one.2, other.2, "{case}: undefended probabilities");
            }
        }
    }
}
