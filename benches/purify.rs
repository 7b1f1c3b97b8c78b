//! Criterion benchmarks: one denoiser call and one full defended frame (T*=140, stride 10,
//! 1 vote: 14 denoiser calls + 1 classifier call) at batch 1 and 8, for both denoisers, on tract
//! with one thread. `benches/compare_ort.py` runs the same work on onnxruntime for the ratio.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use diffshield::config::DefenseConfig;
use diffshield::pipeline::Pipeline;
use ndarray::Array4;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

fn config(denoiser: &str) -> DefenseConfig {
    DefenseConfig {
        models: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")),
        seed: Some(0),
        votes: 1,
        denoiser: denoiser.into(),
        // One thread, as the group's name says (the default is one per core).
        threads: 1,
        ..DefenseConfig::default()
    }
}

fn frames(n: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, 32, 32), |(i, c, h, w)| {
        ((i + c * 5 + h * 3 + w) % 29) as f32 / 28.0
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("tract_1thread");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for tier in ["s", "m"] {
        let mut pipeline = Pipeline::from_config(&config(tier)).expect("shipped models load");
        for batch in [1usize, 8] {
            let x = frames(batch);
            let x_t = x.mapv(|v| 2.0 * v - 1.0);
            group.bench_with_input(
                BenchmarkId::new(format!("denoiser_{tier}_call"), batch),
                &batch,
                |b, _| {
                    b.iter(|| {
                        black_box(pipeline.denoiser_mut().predict_eps(x_t.view(), 140).unwrap())
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("frame_{tier}"), batch),
                &batch,
                |b, _| b.iter(|| black_box(pipeline.decide(x.view(), 0).unwrap())),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
