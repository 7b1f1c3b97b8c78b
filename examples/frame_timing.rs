//! Times one denoiser call and one defended frame on tract (median of a few runs) and prints
//! one JSON line per case; `benches/compare_ort.py` runs it beside onnxruntime for the ratios.
//! Usage: frame_timing [threads] [reps] [s|m|both]; the kernel level is `DIFFSHIELD_KERNELS`'s
//! (printed in each line).

use diffshield::config::DefenseConfig;
use diffshield::pipeline::Pipeline;
use ndarray::Array4;
use std::time::Instant;

fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: builds the plan for this batch size
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As the `diffshield` binary runs: freed model outputs stay mapped (see `memory`).
    diffshield::memory::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let tiers = match args.get(3).map(String::as_str) {
        None | Some("both") => vec!["s", "m"],
        Some(tier) => vec![tier],
    };
    let level = diffshield::backend::KernelLevel::from_env().map_err(anyhow::Error::msg)?;
    for tier in tiers {
        // One purification per frame: the loop onnxruntime runs in benches/ort_frame.py.
        let config =
            DefenseConfig { denoiser: tier.into(), threads, votes: 1, ..DefenseConfig::default() };
        let mut p = Pipeline::from_config(&config)?;
        for batch in [1usize, 8] {
            let x = Array4::from_shape_fn((batch, 3, 32, 32), |(i, c, h, w)| {
                ((i + c * 5 + h * 3 + w) % 29) as f32 / 28.0
            });
            let x_t = x.mapv(|v| 2.0 * v - 1.0);
            let call = median_ms(reps, || {
                p.denoiser_mut().predict_eps(x_t.view(), 140).expect("denoiser runs");
            });
            let frame = median_ms(reps.div_ceil(2), || {
                p.decide(x.view(), 0).expect("pipeline runs");
            });
            println!(
                "{}",
                serde_json::json!({"denoiser": tier, "batch": batch, "threads": threads,
                                   "kernels": level.name(), "call_ms": call, "frame_ms": frame})
            );
        }
    }
    Ok(())
}
