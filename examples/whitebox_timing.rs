//! Times one white-box PGD-EOT gradient (the loss gradient through the whole purifier, averaged
//! over EOT samples) on the burn twin and prints one JSON line; `benches/whitebox_torch.py`
//! runs it beside PyTorch doing the same computation for the ratio.
//! Usage: whitebox_timing [images] [eot] [reps] [denoiser s|m] [device cpu|wgpu]
//! (the first rep of a wgpu run includes compiling its shaders: take reps >= 2).

use diffshield::attack::gradients::{EotNoise, WhiteBoxGradient};
use diffshield::attack::pgd::LossGradient;
use diffshield::grad::burn_twin::{TwinClassifier, TwinDenoiser};
use diffshield::grad::Loss;
use diffshield::manifest::Manifest;
use diffshield::schedule::{DdimPlan, PlanSpec};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| -> anyhow::Result<usize> {
        Ok(raw.get(i).map(|s| s.parse()).transpose()?.unwrap_or(default))
    };
    let (images, eot, reps) = (num(0, 8)?, num(1, 8)?, num(2, 1)?);
    let tier = raw.get(3).map_or("s", String::as_str);
    let device: diffshield::grad::GradDevice = raw.get(4).map_or("cpu", String::as_str).parse()?;
    let manifest = Manifest::load(std::path::Path::new("models"))?;
    let schedule = manifest.schedule()?;
    let plan = DdimPlan::new(&schedule, 1..=500, 140, &PlanSpec::Stride(10), 1.0)?;
    let mut d = TwinDenoiser::load_on(&manifest, tier, device)?;
    let mut c = TwinClassifier::load_on(&manifest, device)?;
    let x = ndarray::Array4::from_shape_fn((images, 3, 32, 32), |(i, ch, h, w)| {
        0.5 + 0.4 * ((i + 1) as f32 * 0.3 * h as f32 + 0.2 * w as f32 + ch as f32).sin()
    });
    let labels: Vec<usize> = (0..images).map(|i| i % 10).collect();
    let mut g = WhiteBoxGradient {
        plan: &plan,
        denoiser: &mut d,
        classifier: &mut c,
        noise: EotNoise {
            seed: 1,
            eot: eot as u32,
            first_frame: 0,
            cell: 1,
            attack: 0,
            known: false,
        },
        loss: Loss::CrossEntropy,
        replay_error: 0.0,
    };
    let mut times = Vec::new();
    for k in 0..reps {
        let t = Instant::now();
        let grad = g.loss_grad(x.view(), &labels, k)?;
        times.push(t.elapsed().as_secs_f64());
        assert!(grad.iter().all(|v| v.is_finite()));
    }
    let first = times[0];
    // The first rep includes one-time work (wgpu: shader compilation), so the median is taken
    // over the later ones where there are any.
    let mut later = if times.len() > 1 { times[1..].to_vec() } else { times.clone() };
    later.sort_by(f64::total_cmp);
    let seconds = later[later.len() / 2];
    println!(
        "{}",
        serde_json::json!({"engine": "diffshield burn twin", "device": device.to_string(),
            "denoiser": tier, "images": images, "eot": eot, "steps": plan.steps().len(),
            "seconds": seconds, "first_seconds": first,
            "samples_per_second": (images * eot) as f64 / seconds})
    );
    Ok(())
}
