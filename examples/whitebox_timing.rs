//! Times one white-box PGD-EOT gradient (the loss gradient through the whole purifier, averaged
//! over EOT samples) on the burn twin and prints one JSON line; `benches/whitebox_torch.py`
//! runs it beside PyTorch doing the same computation for the ratio.
//! Usage: whitebox_timing [images] [eot] [reps]

use diffshield::attack::gradients::{EotNoise, WhiteBoxGradient};
use diffshield::attack::pgd::LossGradient;
use diffshield::grad::burn_twin::{TwinClassifier, TwinDenoiser};
use diffshield::grad::Loss;
use diffshield::manifest::Manifest;
use diffshield::schedule::{DdimPlan, PlanSpec};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let (images, eot, reps) =
        (*args.first().unwrap_or(&8), *args.get(1).unwrap_or(&8), *args.get(2).unwrap_or(&1));
    let manifest = Manifest::load(std::path::Path::new("models"))?;
    let schedule = manifest.schedule()?;
    let plan = DdimPlan::new(&schedule, 1..=500, 140, &PlanSpec::Stride(10), 1.0)?;
    let mut d = TwinDenoiser::load(&manifest, "s")?;
    let mut c = TwinClassifier::load(&manifest)?;
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
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"engine": "diffshield burn twin", "images": images, "eot": eot,
            "steps": plan.steps().len(), "seconds": times[times.len() / 2]})
    );
    Ok(())
}
