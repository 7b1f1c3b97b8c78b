//! The purifier gradient's chain rule, on small smooth models whose input gradients are known
//! in closed form, against central finite differences; and the attack losses.
//!
//! These run without the differentiable twin of the shipped networks: they check the DDIM
//! backward pass, the noise replay and the clip handling, whatever network sits inside.

use diffshield::backend::{Classifier, Denoiser};
use diffshield::grad::check::check_gradient;
use diffshield::grad::purifier::purified_loss_grad;
use diffshield::grad::{DifferentiableClassifier, DifferentiableDenoiser, Loss};
use diffshield::noise::{SeededNoise, StreamId};
use diffshield::schedule::{DdimPlan, PlanSpec, Schedule};
use diffshield::Result;
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

/// eps = tanh(a(t) * x + mix of the channel mean): nonlinear, couples pixels, exact VJP.
struct ToyDenoiser;

fn toy_eps(x: ArrayView4<f32>, t: u32) -> (Array4<f32>, Array4<f32>) {
    let a = 0.5 + t as f32 / 400.0;
    let mean = x.mean_axis(ndarray::Axis(1)).unwrap();
    let mut pre = Array4::zeros(x.raw_dim());
    for ((n, c, h, w), p) in pre.indexed_iter_mut() {
        *p = a * x[[n, c, h, w]] + 0.3 * mean[[n, h, w]];
    }
    let eps = pre.mapv(|p: f32| p.tanh());
    let dtanh = eps.mapv(|e| 1.0 - e * e);
    (eps, dtanh)
}

impl Denoiser for ToyDenoiser {
    fn predict_eps(&mut self, x: ArrayView4<f32>, t: u32) -> Result<Array4<f32>> {
        Ok(toy_eps(x, t).0)
    }
}

impl DifferentiableDenoiser for ToyDenoiser {
    fn eps_vjp(
        &mut self,
        x: ArrayView4<f32>,
        t: u32,
        g: ArrayView4<f32>,
    ) -> Result<(Array4<f32>, Array4<f32>)> {
        let a = 0.5 + t as f32 / 400.0;
        let (eps, dtanh) = toy_eps(x, t);
        let g_pre = &g * &dtanh;
        let channels = x.shape()[1] as f32;
        let g_mean = g_pre.sum_axis(ndarray::Axis(1));
        let mut gx = g_pre.mapv(|v| a * v);
        for ((n, _, h, w), v) in gx.indexed_iter_mut() {
            *v += 0.3 * g_mean[[n, h, w]] / channels;
        }
        Ok((eps, gx))
    }
}

/// logits = W . flatten(image) with a fixed pseudo-random W.
struct ToyClassifier {
    w: Array2<f32>,
}

impl ToyClassifier {
    fn new(features: usize) -> Self {
        let w = Array2::from_shape_fn((10, features), |(k, j)| {
            (((k * 131 + j * 31) % 97) as f32 / 97.0 - 0.5) * 0.2
        });
        Self { w }
    }
}

impl Classifier for ToyClassifier {
    fn logits(&mut self, x: ArrayView4<f32>) -> Result<Array2<f32>> {
        let flat = x.to_shape((x.shape()[0], self.w.ncols())).unwrap().to_owned();
        Ok(flat.dot(&self.w.t()))
    }
}

impl DifferentiableClassifier for ToyClassifier {
    fn logits_vjp(
        &mut self,
        x: ArrayView4<f32>,
        cotangent: &mut dyn FnMut(ArrayView2<f32>) -> Result<Array2<f32>>,
    ) -> Result<(Array2<f32>, Array4<f32>)> {
        let logits = self.logits(x)?;
        let c = cotangent(logits.view())?;
        let g = c.dot(&self.w).into_shape_with_order(x.raw_dim()).unwrap();
        Ok((logits, g))
    }
}

fn images(n: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, 8, 8), |(i, c, h, w)| {
        0.1 + 0.8 * (((i * 13 + c * 7 + h * 3 + w * 5) % 23) as f32 / 22.0)
    })
}

fn plan(t_star: u32, stride: u32, eta: f64) -> DdimPlan {
    DdimPlan::new(&Schedule::ddpm_linear_1000(), 1..=500, t_star, &PlanSpec::Stride(stride), eta)
        .unwrap()
}

fn noise(n: usize) -> SeededNoise {
    SeededNoise::new(7, (0..n as u64).map(|frame| StreamId::of_frame(frame, 0)).collect())
}

#[test]
fn purifier_gradient_matches_finite_differences() {
    for (eta, loss) in [(1.0, Loss::CrossEntropy), (0.0, Loss::CrossEntropy), (1.0, Loss::Margin)] {
        let p = plan(100, 20, eta);
        let x = images(2);
        let labels = [3usize, 8];
        let mut d = ToyDenoiser;
        let mut c = ToyClassifier::new(3 * 8 * 8);
        let out =
            purified_loss_grad(&p, &mut d, &mut c, x.view(), &labels, loss, &mut noise(2)).unwrap();
        assert_eq!(out.replay_error, 0.0, "recomputed steps must equal the stored ones");
        let mut f = |probe: ArrayView4<f32>| -> Result<f64> {
            let o = purified_loss_grad(&p, &mut d, &mut c, probe, &labels, loss, &mut noise(2))?;
            Ok(o.loss.iter().map(|&v| f64::from(v)).sum())
        };
        let check = check_gradient(&mut f, x.view(), out.grad.view(), 24, 1e-3, 1).unwrap();
        assert!(
            check.median_rel_error < 1e-2 && check.max_rel_error < 5e-2,
            "eta {eta} {loss:?}: {check:?}"
        );
    }
}

#[test]
fn the_gradient_depends_on_the_noise_and_is_reproducible_for_a_seed() {
    let p = plan(60, 10, 1.0);
    let x = images(1);
    let (mut d, mut c) = (ToyDenoiser, ToyClassifier::new(3 * 8 * 8));
    let mut run = |seed: u64| {
        let mut n = SeededNoise::new(seed, vec![StreamId::of_frame(0, 0)]);
        purified_loss_grad(&p, &mut d, &mut c, x.view(), &[1], Loss::CrossEntropy, &mut n)
            .unwrap()
            .grad
    };
    let (a, b, other) = (run(1), run(1), run(2));
    assert_eq!(a, b);
    assert_ne!(a, other);
}

#[test]
fn a_noise_source_that_does_not_replay_is_caught() {
    /// Returns new values on every call: the backward pass cannot rebuild the forward states.
    struct Drifting(f32);
    impl diffshield::noise::NoiseSource for Drifting {
        fn fill(&mut self, _: usize, _: usize, out: &mut [f32]) {
            self.0 += 0.25;
            out.iter_mut().for_each(|v| *v = self.0);
        }
    }
    let p = plan(60, 10, 1.0);
    let x = images(1);
    let (mut d, mut c) = (ToyDenoiser, ToyClassifier::new(3 * 8 * 8));
    let err = purified_loss_grad(
        &p,
        &mut d,
        &mut c,
        x.view(),
        &[1],
        Loss::CrossEntropy,
        &mut Drifting(0.0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("differs from the forward pass"), "{err}");
}

#[test]
fn loss_gradients_are_the_closed_forms() {
    let logits = Array2::from_shape_vec((2, 3), vec![1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0]).unwrap();
    let (v, g) = Loss::CrossEntropy.value_and_grad(logits.view(), &[1, 0]).unwrap();
    let lse0 = (1f32.exp() + 2f32.exp() + 0.5f32.exp()).ln();
    assert!((v[0] - (lse0 - 2.0)).abs() < 1e-6);
    assert!((g.row(0).sum()).abs() < 1e-6, "softmax - onehot sums to 0");
    assert!((g[[0, 1]] - (2f32.exp() / lse0.exp() - 1.0)).abs() < 1e-6);
    let (v, g) = Loss::Margin.value_and_grad(logits.view(), &[1, 0]).unwrap();
    assert_eq!(v, vec![-1.0, 4.0]);
    assert_eq!(g.row(1).to_vec(), vec![-1.0, 0.0, 1.0]);
    let err = Loss::Margin.value_and_grad(logits.view(), &[1, 7]).unwrap_err();
    assert!(err.to_string().contains("label 7"), "{err}");
}
