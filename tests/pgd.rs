//! PGD's invariants and the attack report, without any network: a pseudo-random gradient
//! oracle drives PGD as hard as any real one could, and the iterates must stay in the eps-ball
//! and the [0,1] box; reports round-trip and count as documented.

use diffshield::attack::gradients::AttackMode;
use diffshield::attack::harness::{AttackKind, HarnessConfig, ImageOutcome};
use diffshield::attack::pgd::{distances, pgd, LossGradient, PgdConfig};
use diffshield::attack::report::{AttackReport, COUNTING};
use diffshield::attack::ThreatModel;
use diffshield::config::DefenseConfig;
use diffshield::grad::Loss;
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

fn outcome(index: usize, runs_correct: u32) -> ImageOutcome {
    ImageOutcome { index, label: index % 10, runs_correct, distance: 0.01 }
}

fn report() -> AttackReport {
    let mut r = AttackReport {
        data: "x.bin".into(),
        images: 2,
        config: DefenseConfig::default(),
        harness: HarnessConfig {
            attack: AttackKind::Pgd,
            steps: 10,
            step_size: None,
            eot: 2,
            queries: 0,
            runs: 4,
            seed: 0,
            loss: Loss::CrossEntropy,
            random_start: true,
        },
        threats: vec!["linf:8/255".into(), "l2:1".into()],
        modes: vec![AttackMode::Bpda, AttackMode::WhiteBox],
        counting: COUNTING.into(),
        clean_acc: 0.75,
        clean_acc_worst: 0.5,
        clean_acc_majority: 0.5,
        undefended_clean_acc: 1.0,
        results: Vec::new(),
        summary: Vec::new(),
        complete: false,
        seconds: 1.0,
    };
    r.cell_mut("linf:8/255", AttackMode::Bpda).add(vec![outcome(0, 4), outcome(1, 1)], 4, 0.5);
    r.cell_mut("l2:1", AttackMode::Bpda).add(vec![outcome(0, 2), outcome(1, 3)], 4, 0.5);
    r.cell_mut("linf:8/255", AttackMode::WhiteBox).add(vec![outcome(1, 0)], 4, 0.5);
    r.summarise(4);
    r
}

#[test]
fn reports_count_as_documented_and_round_trip() {
    let r = report();
    let bpda = &r.results[0];
    assert_eq!(bpda.robust_acc, (1.0 + 0.25) / 2.0);
    assert_eq!(bpda.robust_acc_worst, 0.5);
    assert_eq!(bpda.robust_acc_majority, 0.5);
    // AwT: mean over threat models; AoA: per image the worst threat model.
    let s = r.summary[0];
    assert_eq!(s.awt, (0.625 + 0.625) / 2.0);
    assert_eq!(s.aoa, (0.5 + 0.25) / 2.0);
    assert!(!r.complete, "white-box has one image of two and no l2 cell");
    let text = serde_json::to_string(&r).unwrap();
    let back: AttackReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
    assert!(back.resumable_with(&r).is_ok());
    let mut other = r.clone();
    other.harness.eot = 3;
    assert!(back.resumable_with(&other).is_err());
}

#[test]
fn markdown_and_junit_show_every_cell() {
    let r = report();
    let md = r.markdown();
    assert!(md.contains("| attack mode | clean | linf:8/255 | l2:1 | AwT | AoA |"), "{md}");
    assert!(md.contains("| bpda | 75.0 | 62.5 | 62.5 | 62.5 | 37.5 |"), "{md}");
    assert!(md.contains("0.0 (1/2)"), "a partial cell says so: {md}");
    let xml = r.junit(&|m, _| (m == AttackMode::Bpda).then_some(0.6));
    assert!(xml.contains("tests=\"3\" failures=\"0\""), "{xml}");
    let xml = r.junit(&|_, _| Some(0.7));
    assert!(xml.contains("failures=\"3\""), "{xml}");
    assert!(xml.contains("robust_acc 0.6250 below min-acc 0.7000"), "{xml}");
}
