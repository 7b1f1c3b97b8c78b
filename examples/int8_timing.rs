//! int8 against float32 on tract, interleaved in one process: one denoiser call at t=140 and
//! one defended frame (T*=140, stride 10, eta 1, 1 vote), batch 1 and 8. Each repetition runs
//! the f32 case then the int8 case, so both see the same machine load; prints one JSON line per
//! case with the medians. `benches/compare_int8.py` adds onnxruntime f32 beside it.
//! Usage: int8_timing [threads] [reps] [denoiser tier: s (default) or m]

use diffshield::config::{DefenseConfig, Precision};
use diffshield::pipeline::Pipeline;
use ndarray::Array4;
use std::time::Instant;

fn ms(f: &mut dyn FnMut()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As the `diffshield` binary runs: freed model outputs stay mapped (see `memory`).
    diffshield::memory::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(7);
    let denoiser = args.get(3).cloned().unwrap_or_else(|| "s".into());
    let pipe = |precision| {
        let denoiser = denoiser.clone();
        Pipeline::from_config(&DefenseConfig {
            votes: 1,
            threads,
            precision,
            denoiser,
            ..DefenseConfig::default()
        })
    };
    let mut p = [pipe(Precision::F32)?, pipe(Precision::Int8)?];
    for batch in [1usize, 8] {
        let x = Array4::from_shape_fn((batch, 3, 32, 32), |(i, c, h, w)| {
            ((i + c * 5 + h * 3 + w) % 29) as f32 / 28.0
        });
        let x_t = x.mapv(|v| 2.0 * v - 1.0);
        let mut call = [vec![], vec![]];
        let mut frame = [vec![], vec![]];
        for rep in 0..=reps {
            for k in 0..2 {
                let c = ms(&mut || {
                    p[k].denoiser_mut().predict_eps(x_t.view(), 140).expect("denoiser runs");
                });
                let f = ms(&mut || {
                    p[k].decide(x.view(), 0).expect("pipeline runs");
                });
                if rep > 0 {
                    // rep 0 is the warm-up that builds the plans for this batch size
                    call[k].push(c);
                    frame[k].push(f);
                }
            }
        }
        let [c32, c8] = call.map(median);
        let [f32_, f8] = frame.map(median);
        println!(
            "{}",
            serde_json::json!({"denoiser": denoiser, "batch": batch, "threads": threads, "reps": reps,
                "f32_call_ms": c32, "int8_call_ms": c8, "f32_frame_ms": f32_, "int8_frame_ms": f8,
                "call_speedup": c32 / c8, "frame_speedup": f32_ / f8})
        );
    }
    Ok(())
}
