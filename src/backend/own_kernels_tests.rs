//! This crate's kernels inside real plans (moved here from tests/ when the kernels became
//! crate-private) (direct convs, fused GroupNorm, attention): the shipped models
//! prepared with them give the outputs tract's own ops give, at batch 1 and at a batch > 1.

use super::direct_conv::DirectConv;
use super::simd::{levels_under_test, KernelLevel};
use super::tract_opt::{optimise, prepare};
use std::collections::HashMap;
use tract_onnx::prelude::*;

/// Runs `path` at batch `n` with and without the direct kernel on the same inputs; returns
/// ([DirectConv, GroupNorm, Attention, Silu, ChannelConcat] node counts, largest
/// |difference| / (1 + |reference|), output length).
fn compare(path: &str, n: usize, with_t: bool, level: KernelLevel) -> ([usize; 5], f32, usize) {
    let typed =
        tract_onnx::onnx().model_for_path(path).expect("loads").into_typed().expect("typed");
    let x = tract_ndarray::Array4::from_shape_fn((n, 3, 32, 32), |(b, c, h, w)| {
        ((b * 7 + c * 5 + h * 3 + w) % 29) as f32 / 14.0 - 1.0
    });
    let mut inputs: TVec<TValue> = tvec![x.into_tensor().into_tvalue()];
    if with_t {
        let t = tract_ndarray::Array1::from_shape_fn(n, |b| 140.0 - b as f32);
        inputs.push(t.into_tensor().into_tvalue());
    }
    let run = |level: KernelLevel| {
        let prepared = prepare(typed.clone(), level).expect("prepares");
        let TDim::Sym(batch) = prepared.input_fact(0).expect("input").shape[0].clone() else {
            panic!("{path}: symbolic batch expected")
        };
        let fixed = prepared.set_symbols(&HashMap::from([(batch, TDim::from(n as i64))]));
        let plan = optimise(fixed.expect("batch")).expect("optimises");
        let count = |name: &str| plan.nodes().iter().filter(|node| node.op.name() == name).count();
        let counts = ["DirectConv", "GroupNorm", "Attention", "Silu", "ChannelConcat"].map(count);
        let out = plan.into_runnable().expect("plan").run(inputs.clone()).expect("runs");
        let out: Vec<f32> =
            out[0].to_plain_array_view::<f32>().expect("f32").iter().copied().collect();
        (counts, out)
    };
    let (counts, direct) = run(level);
    let (none, reference) = run(KernelLevel::Tract);
    assert_eq!([none[0], none[1], none[2], none[4]], [0; 4], "the reference must not use ours");
    let worst = direct
        .iter()
        .zip(&reference)
        .map(|(d, r)| (d - r).abs() / (1.0 + r.abs()))
        .fold(0f32, f32::max);
    (counts, worst, direct.len())
}

#[test]
fn shipped_models_match_tracts_own_ops() {
    // denoiser_s (and m, wider) has 38 3x3 stride-1 convs, 2 3x3 stride-2 convs, 22 1x1 convs,
    // 41 GroupNorms, 6 attention blocks and 10 axis-1 concats (the time embedding's and the
    // decoder's skip connections), the classifier 8 3x3 stride-1 convs and none of the others
    // (the ONNX files). 35 of the norms are followed by a SiLU
    // (Sigmoid and Mul in the file), folded into ours; the time embedding's 2 stay tract's.
    for level in levels_under_test() {
        let direct = |n: usize| if DirectConv::available(level) { n } else { 0 };
        for (path, with_t, want) in [
            ("models/denoiser_s.onnx", true, [direct(62), 41, 6, 2, 10]),
            ("models/denoiser_m.onnx", true, [direct(62), 41, 6, 2, 10]),
            ("models/classifier.onnx", false, [direct(8), 0, 0, 0, 0]),
        ] {
            for n in [1, 3] {
                let (counts, worst, len) = compare(path, n, with_t, level);
                let case = format!("{path} batch {n} level {}", level.name());
                assert_eq!(counts, want, "{case}: [direct, GroupNorm, attention, SiLU, concat]");
                assert!(len > 0);
                // Same sums in a different order: float32 rounding, ~1e-6 relative per op.
                assert!(worst < 1e-4, "{case}: outputs differ by {worst:e}");
                println!("{case}: {counts:?} of our ops, worst relative difference {worst:e}");
            }
        }
    }
}

/// The int8 models with our int8 convs against tract's own QOperator ops and the f32 models:
/// the number of convs swapped in (none without AVX-512 VNNI), and outputs about as close to
/// f32 as tract's int8 graph on a synthetic input (our op skips each conv's output
/// quantization; on real images it is closer, see tests/int8.rs and docs/int8.md).
#[test]
fn int8_models_match_tracts_own_int8_ops() {
    use super::quant_conv::QuantConv;
    if !KernelLevel::Avx512.supported() {
        crate::test_skip::note(
            "our int8 convs not tested: this CPU has no AVX-512 (tract's int8 ops run here)",
        );
        return;
    }
    let int8 = |n: usize| if QuantConv::supported() { n } else { 0 };
    // denoiser_s.int8 quantizes its 60 stride-1 convs (the two stride-2 ones stay float), the
    // classifier all 8.
    for (name, with_t, want) in [("denoiser_s", true, int8(60)), ("classifier", false, int8(8))] {
        let n = 2;
        let x = tract_ndarray::Array4::from_shape_fn((n, 3, 32, 32), |(b, c, h, w)| {
            ((b * 7 + c * 5 + h * 3 + w) % 29) as f32 / 29.0
        });
        let mut inputs: TVec<TValue> = tvec![x.into_tensor().into_tvalue()];
        if with_t {
            inputs.push(tract_ndarray::Array1::from_elem(n, 140f32).into_tensor().into_tvalue());
        }
        let run = |path: &str, level: KernelLevel| {
            let typed = tract_onnx::onnx().model_for_path(path).expect("loads");
            let prepared = prepare(typed.into_typed().expect("typed"), level).expect("prepares");
            let TDim::Sym(batch) = prepared.input_fact(0).expect("input").shape[0].clone() else {
                panic!("{path}: symbolic batch expected")
            };
            let fixed = prepared.set_symbols(&HashMap::from([(batch, TDim::from(n as i64))]));
            let plan = optimise(fixed.expect("batch")).expect("optimises");
            // Nodes of op `name` whose info mentions `word` (all of them for "").
            let count_of = |name: &str, word: &str| {
                let nodes = plan.nodes().iter().filter(|node| node.op.name() == name);
                nodes.filter(|node| node.op.info().is_ok_and(|i| i.concat().contains(word))).count()
            };
            let count = count_of("QuantConv", "");
            // Attention blocks with bf16 products, int8 convs adding the residual or
            // time-embedding tensor as they write.
            let (bf16, adding) = (count_of("Attention", "bf16"), count_of("QuantConv", "adding"));
            let out = plan.into_runnable().expect("plan").run(inputs.clone()).expect("runs");
            let out: Vec<f32> =
                out[0].to_plain_array_view::<f32>().expect("f32").iter().copied().collect();
            (count, bf16, adding, out)
        };
        let int8_path = format!("models/{name}.int8.onnx");
        let (count, bf16, adding, ours) = run(&int8_path, KernelLevel::Avx512);
        let (none, _, _, theirs) = run(&int8_path, KernelLevel::Tract);
        let (_, float_bf16, _, float) = run(&format!("models/{name}.onnx"), KernelLevel::best());
        // Every Add after an int8 conv in denoiser_s (23 residual sums, 17 time embeddings)
        // is folded into it; the classifier's two residual sums follow a ReLU.
        let want_adding = if name == "denoiser_s" && count > 0 { 40 } else { 0 };
        assert_eq!(adding, want_adding, "{name}: int8 convs adding to their output");
        assert_eq!((count, none), (want, 0), "{name}: QuantConv nodes with / without our ops");
        // denoiser_s has 6 attention blocks (5 at 16 x 16, 1 at 8 x 8), the classifier none;
        // bf16 products only in an int8 model with our int8 convs, on a CPU with AVX-512 BF16.
        let bf16_blocks = if name == "denoiser_s" { 6 } else { 0 };
        let want_bf16 =
            if count > 0 && super::attention_bf16::supported() { bf16_blocks } else { 0 };
        assert_eq!((bf16, float_bf16), (want_bf16, 0), "{name}: bf16 attention blocks");
        assert!(ours.iter().all(|v| v.is_finite()));
        let rel = |a: &[f32]| {
            let diff: f32 = a.iter().zip(&float).map(|(a, b)| (a - b) * (a - b)).sum();
            (diff / float.iter().map(|b| b * b).sum::<f32>()).sqrt()
        };
        let (r_ours, r_theirs) = (rel(&ours), rel(&theirs));
        eprintln!("{name}: {count} int8 convs; relative L2 to f32: ours {r_ours:.4}, tract's int8 {r_theirs:.4}");
        // Measured: 0.058 vs 0.069 (denoiser), 0.069 vs 0.083 (classifier). A wrong weight,
        // zero point or scale moves the outputs by tens of percent.
        assert!(
            r_ours < 0.1 && r_ours < 1.5 * r_theirs,
            "{name}: ours {r_ours}, tract's {r_theirs}"
        );
    }
}
