//! PGD's invariants without any network: a pseudo-random gradient oracle drives PGD as hard as
//! any real one could, and the iterates must stay in the eps-ball and the [0,1] box. (The
//! report's counting tests live beside the report writers, in src/attack/report.rs.)

use diffshield::attack::pgd::{distances, pgd, LossGradient, PgdConfig};
use diffshield::attack::ThreatModel;
use diffshield::Result;
use ndarray::{Array4, ArrayView4};

/// Gradients with random signs and huge, tiny or zero magnitudes.
struct Wild(u64);

impl LossGradient for Wild {
    fn loss_grad(&mut self, x: ArrayView4<f32>, _: &[usize], k: usize) -> Result<Array4<f32>> {
        let mut s = self.0 ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(Array4::from_shape_fn(x.raw_dim(), |_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            match s % 5 {
                0 => 0.0,
                1 => 1e30,
                2 => -1e-30,
                _ => (s % 1000) as f32 - 500.0,
            }
        }))
    }
}

#[test]
fn pgd_never_leaves_the_ball_or_the_box() {
    let threats = ["linf:8/255", "linf:16/255", "l2:0.5", "l2:2", "linf:0", "l2:100"];
    for (case, threat) in threats.iter().enumerate() {
        let threat: ThreatModel = threat.parse().unwrap();
        for seed in 0..6u64 {
            // Clean images touching both ends of the box, so that clipping matters.
            let x = Array4::from_shape_fn((3, 3, 8, 8), |(i, c, h, w)| {
                [0.0, 1.0, 0.5, 0.01, 0.99][(i + c + h * seed as usize + w) % 5]
            });
            let cfg = PgdConfig {
                threat,
                steps: 7,
                step_size: PgdConfig::default_step_size(threat, 7) * (1.0 + seed as f64),
                random_start: seed % 2 == 0,
                seed,
            };
            let adv = pgd(&mut Wild(seed + 31 * case as u64), x.view(), &[0, 1, 2], &cfg).unwrap();
            for d in distances(adv.view(), x.view(), threat.norm) {
                assert!(d <= threat.eps * (1.0 + 1e-5) + 1e-6, "{threat} seed {seed}: {d}");
            }
            assert!(adv.iter().all(|v| (0.0..=1.0).contains(v)), "{threat}: outside [0,1]");
        }
    }
}

#[test]
fn pgd_refuses_mismatched_labels_and_bad_steps() {
    let x = Array4::<f32>::zeros((2, 3, 4, 4));
    let cfg = PgdConfig {
        threat: "linf:8/255".parse().unwrap(),
        steps: 1,
        step_size: f64::NAN,
        random_start: false,
        seed: 0,
    };
    assert!(pgd(&mut Wild(1), x.view(), &[0], &cfg).is_err());
    assert!(pgd(&mut Wild(1), x.view(), &[0, 1], &cfg).unwrap_err().to_string().contains("step"));
}
