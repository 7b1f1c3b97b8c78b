//! Square Attack on a toy model whose robustness is known in closed form: the class is whether
//! the mean pixel is above 0.5, so an image is attackable exactly when eps can move its mean
//! across 0.5.

use diffshield::attack::square::{square_attack, SquareConfig};
use diffshield::attack::{Norm, ThreatModel};
use diffshield::Result;
use ndarray::{Array2, Array4, ArrayView4, Axis};
use std::cell::Cell;

fn mean_model(calls: &Cell<usize>) -> impl FnMut(ArrayView4<f32>, u64) -> Result<Array2<f32>> + '_ {
    move |x: ArrayView4<f32>, _q: u64| {
        calls.set(calls.get() + x.shape()[0]);
        let m: Vec<f32> = x.outer_iter().map(|i| i.mean().unwrap()).collect();
        Ok(Array2::from_shape_fn(
            (m.len(), 2),
            |(i, c)| if c == 1 { m[i] - 0.5 } else { 0.5 - m[i] },
        ))
    }
}

/// Images of constant value `v` with a little texture, label 1 (mean above 0.5).
fn images(values: &[f32]) -> Array4<f32> {
    Array4::from_shape_fn((values.len(), 3, 8, 8), |(i, c, h, w)| {
        values[i] + 0.01 * (((c + h * 3 + w * 5) % 7) as f32 - 3.0) / 3.0
    })
}

fn check_ball(x: &Array4<f32>, adv: &Array4<f32>, t: &ThreatModel) {
    for (a, b) in adv.outer_iter().zip(x.outer_iter()) {
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)), "left the [0,1] box");
        let d = &a - &b;
        let size = match t.norm {
            Norm::Linf => d.iter().fold(0f32, |m, v| m.max(v.abs())),
            Norm::L2 => d.iter().map(|v| v * v).sum::<f32>().sqrt(),
        };
        assert!(size <= t.eps as f32 + 1e-5, "{:?} perturbation {size} > eps {}", t.norm, t.eps);
    }
}

#[test]
fn linf_square_fools_exactly_the_attackable_images_within_budget() {
    // eps 8/255 = 0.031: images at 0.51 and 0.52 can cross 0.5, 0.6 and 0.9 cannot.
    let x = images(&[0.51, 0.6, 0.52, 0.9]);
    let t: ThreatModel = "linf:8/255".parse().unwrap();
    let calls = Cell::new(0);
    let mut model = mean_model(&calls);
    let cfg = SquareConfig { threat: t, queries: 300, p_init: 0.05, seed: 1, early_stop: true };
    let out = square_attack(&mut model, x.view(), &[1, 1, 1, 1], &cfg).unwrap();
    assert_eq!(out.fooled, vec![true, false, true, false]);
    assert!(out.queries.iter().all(|&q| q <= 300));
    assert_eq!(out.queries[1], 300, "an unbroken image spends the whole budget");
    assert_eq!(calls.get(), out.queries.iter().sum::<usize>(), "every image-forward is counted");
    check_ball(&x, &out.adversarial, &t);
    // The fooled images really are misclassified by the model.
    for i in [0, 2] {
        assert!(out.adversarial.index_axis(Axis(0), i).mean().unwrap() < 0.5);
    }
}

#[test]
fn l2_square_stays_in_the_ball_and_breaks_a_weak_image() {
    // L2 eps 1 on 192 values moves the mean by at most 1/sqrt(192) = 0.072.
    let x = images(&[0.53, 0.7]);
    let t: ThreatModel = "l2:1.0".parse().unwrap();
    let calls = Cell::new(0);
    let mut model = mean_model(&calls);
    let cfg = SquareConfig { threat: t, queries: 500, p_init: 0.1, seed: 2, early_stop: true };
    let out = square_attack(&mut model, x.view(), &[1, 1], &cfg).unwrap();
    check_ball(&x, &out.adversarial, &t);
    assert_eq!(out.fooled, vec![true, false]);
    assert!(out.queries.iter().all(|&q| q <= 500));
}

#[test]
fn eps_zero_changes_nothing() {
    let x = images(&[0.51, 0.6]);
    let calls = Cell::new(0);
    let mut model = mean_model(&calls);
    let cfg = SquareConfig {
        threat: "linf:0".parse().unwrap(),
        queries: 20,
        p_init: 0.05,
        seed: 3,
        early_stop: true,
    };
    let out = square_attack(&mut model, x.view(), &[1, 1], &cfg).unwrap();
    assert_eq!(out.adversarial, x);
    assert_eq!(out.fooled, vec![false, false]);
}

#[test]
fn threat_models_parse_and_bad_ones_are_named() {
    let t: ThreatModel = "linf:8/255".parse().unwrap();
    assert_eq!(t.norm, Norm::Linf);
    assert!((t.eps - 8.0 / 255.0).abs() < 1e-12);
    assert_eq!(t.to_string(), "linf:8/255");
    assert_eq!("L2:0.5".parse::<ThreatModel>().unwrap().eps, 0.5);
    for bad in ["linf", "l3:1", "linf:-1", "linf:x/255", "l2:nan"] {
        let e = bad.parse::<ThreatModel>().unwrap_err().to_string();
        assert!(e.contains("expected NORM:EPS"), "{bad}: {e}");
    }
    assert_eq!(ThreatModel::paper_defaults().len(), 4);
}

#[test]
fn without_early_stop_every_image_spends_the_whole_budget() {
    let x = images(&[0.51, 0.6]);
    let calls = Cell::new(0);
    let mut model = mean_model(&calls);
    let t: ThreatModel = "linf:8/255".parse().unwrap();
    let cfg = SquareConfig { threat: t, queries: 300, p_init: 0.05, seed: 4, early_stop: false };
    let out = square_attack(&mut model, x.view(), &[1, 1], &cfg).unwrap();
    assert_eq!(out.queries, vec![300, 300]);
    assert_eq!(out.fooled, vec![true, false]);
    check_ball(&x, &out.adversarial, &t);
}
