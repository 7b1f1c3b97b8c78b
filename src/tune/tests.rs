//! The sweep's report writers and plots on hand-made results (moved here from tests/tune.rs
//! when the writers became crate-private).

use super::grid::{GridPoint, PlanChoice};
use super::{
    pareto, AttackSettings, LatencyStats, MeasureSettings, PointResult, RobustResult, TuneOutcome,
};
use crate::attack::{AttackKind, ThreatModel};
use crate::config::DefenseConfig;

#[path = "../../tests/common/svg.rs"]
mod svg;
use svg::assert_svg;

fn hand_result(t_star: u32, denoiser: &str, p50: f64, clean: f64, robust: f64) -> PointResult {
    let point = GridPoint {
        denoiser: denoiser.into(),
        t_star,
        plan: PlanChoice::Steps(4),
        eta: 1.0,
        votes: 1,
        threads: 1,
    };
    PointResult {
        key: format!("test|{}", point.canonical()),
        label: point.label(),
        point,
        timesteps: vec![t_star, t_star * 3 / 4, t_star / 2, t_star / 4, 0],
        latency: LatencyStats {
            p50_ms: p50,
            p99_ms: p50 * 1.5,
            mean_ms: p50,
            frames: 8,
            cpu_p50_ms: Some(p50 * 0.9),
        },
        clean_acc: clean,
        clean_images: 8,
        robust: Some(RobustResult {
            attack: "square linf:8/255, 4 queries, 4 images, 2 runs".into(),
            images: 4,
            runs: 2,
            clean_acc: Some(clean),
            mean: robust,
            worst: robust / 2.0,
            fooled_during_attack: 1,
        }),
        seconds: 1.0,
        finished_unix: 0,
        cached: false,
    }
}

fn hand_outcome() -> TuneOutcome {
    let results = vec![
        hand_result(20, "s", 40.0, 0.9, 0.3),
        hand_result(60, "s", 41.0, 0.8, 0.5),
        hand_result(140, "s", 42.0, 0.6, 0.45),
        hand_result(60, "m", 90.0, 0.85, 0.6),
    ];
    let pairs: Vec<(f64, f64)> =
        results.iter().map(|r| (r.latency.p50_ms, r.objective())).collect();
    TuneOutcome {
        clock: super::LatencyClock::Wall,
        on_frontier: pareto::frontier(&pairs),
        frontier: pareto::frontier_order(&pairs),
        results,
        measured: 4,
        cached: 0,
        pending: vec![],
        seconds: 1.0,
        files: None,
    }
}

#[test]
fn csv_has_the_header_and_one_row_per_point() {
    let o = hand_outcome();
    assert_eq!(o.on_frontier, vec![true, true, false, true]);
    let text = super::report::csv(&o.results, &o.on_frontier);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + o.results.len());
    assert_eq!(lines[0], super::report::CSV_COLUMNS.join(","));
    assert!(lines[0].starts_with("label,denoiser,t_star,stride,steps_spec,ddim_steps,eta,votes"));
    // The attack description has commas and is quoted; every row has the header's field count.
    let fields = |l: &str| {
        let mut n = 1;
        let mut quoted = false;
        for c in l.chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => n += 1,
                _ => {}
            }
        }
        n
    };
    for l in &lines {
        assert_eq!(fields(l), super::report::CSV_COLUMNS.len(), "{l}");
    }
    assert!(
        lines[2].starts_with("s T*60 4steps eta1 v1 t1,s,60,,4,4,1,1,1,41.00,61.50,41.00,36.90,")
    );
    assert!(lines[2].contains(",0.8000,0.5000,0.2500,4,2,true,"), "{}", lines[2]);
    assert!(lines[3].contains(",false,"), "{}", lines[3]);
    let settings = MeasureSettings {
        data: "x.bin".into(),
        clean_images: 8,
        warmup: 1,
        attack: AttackSettings {
            kind: Some(AttackKind::Square),
            threat: "linf:8/255".parse::<ThreatModel>().unwrap(),
            queries: 2,
            pgd_steps: 1,
            eot: 1,
            images: 8,
            runs: 1,
        },
        base: DefenseConfig::default(),
        clock: super::LatencyClock::Auto,
    };
    let md = super::report::markdown(&o, &settings);
    assert_eq!(md.lines().filter(|l| l.starts_with("| s ") || l.starts_with("| m ")).count(), 3);
}

#[test]
fn plots_are_valid_svg_with_labels() {
    let o = hand_outcome();
    let svg = super::plot::pareto_svg(&o, "robust accuracy (%)").unwrap();
    assert_svg(&svg, &["Pareto frontier", "p50 latency", "s T*60 4steps eta1 v1 t1", "<circle"]);
    // The dominated point is drawn but not labelled.
    assert!(!svg.contains("s T*140 4steps"));
    let svg = super::plot::depth_svg(&o.results, "square").unwrap();
    assert_svg(&svg, &["T*", "clean, s 4steps eta1 v1 t1", "robust (square)"]);
    // Only the group with the most T* values (denoiser s: three) is plotted.
    assert!(!svg.contains("clean, m "));
    assert_eq!(super::plot::depth_groups(&o.results).len(), 1);
}
