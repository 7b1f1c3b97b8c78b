//! Gradient checks: an analytic input gradient against central finite differences.
//!
//! The networks run in f32, so a difference quotient carries rounding noise of about
//! `eps_f32 * |loss| / h`. The step `h` trades that against the curvature error (and against
//! crossing one of the purifier's clip kinks), and the relative error of a coordinate is measured
//! against a floor proportional to the gradient's largest entry, so that coordinates whose true
//! derivative is almost zero do not report noise as error.

use crate::error::{Error, Result};
use ndarray::{Array4, ArrayView4};
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

/// One-sided slopes differing by more than this fraction mark a kink within h. Smooth
/// functions differ by about |f''| h, far below it at the default h = 1e-3.
pub const KINK_RATIO: f64 = 0.2;

/// One checked coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CoordCheck {
    /// Flat index into the input (n, c, h, w in row-major order).
    pub index: usize,
    /// The analytic derivative.
    pub analytic: f64,
    /// (f(x + h e_i) - f(x - h e_i)) / 2h.
    pub numeric: f64,
    /// |analytic - numeric| / max(|analytic|, |numeric|, floor).
    pub rel_error: f64,
    /// The one-sided slopes disagree: a ReLU or clip kink lies within h, where a difference
    /// quotient says nothing about the derivative. Left out of the error statistics.
    pub kink: bool,
}

/// Outcome of a gradient check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GradCheck {
    /// Finite-difference step, in input units.
    pub h: f64,
    /// Denominator floor: `FLOOR_FRACTION` times the largest |analytic| entry.
    pub floor: f64,
    /// Every checked coordinate.
    pub coords: Vec<CoordCheck>,
    /// Coordinates left out because a kink lies within h of them.
    pub kinks: usize,
    /// Largest relative error over the coordinates without a kink.
    pub max_rel_error: f64,
    /// Median relative error.
    pub median_rel_error: f64,
}

/// The denominator floor as a fraction of the gradient's largest entry: f32 difference
/// quotients of these networks carry about 1e-3 of absolute noise (measured against the
/// agreement of the largest entries to 0.1 %), which must not count as error.
pub const FLOOR_FRACTION: f64 = 5e-2;

/// Compares `analytic` (the gradient of `f` at `x`) with central differences of `f` on `coords`
/// coordinates: half drawn uniformly, half among the largest analytic entries (where an error
/// matters most), chosen with `seed`. `f` must be deterministic (replay the same noise).
///
/// A coordinate whose two one-sided slopes differ by more than [`KINK_RATIO`] of their size has
/// a kink (ReLU, max-pool, clip) within h and is reported but not scored; more than half the
/// coordinates with kinks is an error, since the check would then say nothing.
pub fn check_gradient(
    f: &mut dyn FnMut(ArrayView4<f32>) -> Result<f64>,
    x: ArrayView4<f32>,
    analytic: ArrayView4<f32>,
    coords: usize,
    h: f64,
    seed: u64,
) -> Result<GradCheck> {
    if x.shape() != analytic.shape() {
        return Err(Error::Backend(format!(
            "gradient shape {:?} differs from input shape {:?}",
            analytic.shape(),
            x.shape()
        )));
    }
    if !(h > 0.0 && h.is_finite()) || coords == 0 || coords > x.len() {
        return Err(Error::InvalidConfig(format!(
            "gradient check needs h > 0 and 1..={} coordinates, the input's values (h={h}, \
             coords={coords})",
            x.len()
        )));
    }
    let flat: Vec<f32> = analytic.iter().copied().collect();
    let scale = flat.iter().fold(0.0f64, |m, &g| m.max(f64::from(g).abs()));
    let floor = (FLOOR_FRACTION * scale).max(f64::MIN_POSITIVE);
    let indices = pick_coordinates(&flat, coords, seed);

    let mut probe: Array4<f32> = x.to_owned();
    let centre = f(probe.view())?;
    let mut out = Vec::with_capacity(indices.len());
    for &i in &indices {
        let orig = probe.as_slice().map(|s| s[i]).ok_or_else(not_contiguous)?;
        set(&mut probe, i, (f64::from(orig) + h) as f32)?;
        let up = f(probe.view())?;
        set(&mut probe, i, (f64::from(orig) - h) as f32)?;
        let down = f(probe.view())?;
        set(&mut probe, i, orig)?;
        let numeric = (up - down) / (2.0 * h);
        let a = f64::from(flat[i]);
        let rel_error = (a - numeric).abs() / a.abs().max(numeric.abs()).max(floor);
        let (right, left) = ((up - centre) / h, (centre - down) / h);
        let kink = (right - left).abs() > KINK_RATIO * right.abs().max(left.abs()).max(floor);
        out.push(CoordCheck { index: i, analytic: a, numeric, rel_error, kink });
    }
    let mut errs: Vec<f64> = out.iter().filter(|c| !c.kink).map(|c| c.rel_error).collect();
    let kinks = out.len() - errs.len();
    if 2 * kinks > out.len() {
        return Err(Error::InvalidConfig(format!(
            "gradient check: {kinks} of {} coordinates have a kink within h={h}; use a smaller h",
            out.len()
        )));
    }
    errs.sort_by(f64::total_cmp);
    Ok(GradCheck {
        h,
        floor,
        kinks,
        max_rel_error: errs.last().copied().unwrap_or(0.0),
        median_rel_error: errs[errs.len() / 2],
        coords: out,
    })
}

/// A named check of the standard set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedCheck {
    /// `classifier`, `denoiser` or `purifier`.
    pub name: String,
    /// Its outcome.
    pub check: GradCheck,
    /// Largest replay error of the purifier's backward pass (0 for the others).
    pub replay_error: f32,
}

/// The three checks the harness relies on, at `images` (\[0,1\] pixels) with `labels`: the
/// classifier's cross-entropy; one denoiser call at the plan's T* (the scalar
/// `sum(w * eps(x_t))` for fixed pseudo-random weights w); and the loss through the whole
/// purifier with the noise of `noise_seed` replayed.
#[allow(clippy::too_many_arguments)]
pub fn standard_checks(
    plan: &crate::schedule::DdimPlan,
    denoiser: &mut dyn super::DifferentiableDenoiser,
    classifier: &mut dyn super::DifferentiableClassifier,
    images: ArrayView4<f32>,
    labels: &[usize],
    coords: usize,
    h: f64,
    seed: u64,
) -> Result<Vec<NamedCheck>> {
    use super::{classifier_loss_grad, Loss};
    use crate::noise::{SeededNoise, StreamId};
    let mut out = Vec::new();

    let (_, g) = classifier_loss_grad(classifier, images, labels, Loss::CrossEntropy)?;
    let mut f = |x: ArrayView4<f32>| -> Result<f64> {
        let (v, _) = classifier_loss_grad(classifier, x, labels, Loss::CrossEntropy)?;
        Ok(v.iter().map(|&l| f64::from(l)).sum())
    };
    let check = check_gradient(&mut f, images, g.view(), coords, h, seed)?;
    out.push(NamedCheck { name: "classifier".into(), check, replay_error: 0.0 });

    // One denoiser call on x_t = sqrt(abar) x0 + sqrt(1 - abar) z at T*.
    let (a, b) = plan.start_coeffs();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0xd1ff);
    let mut x_t = images.mapv(|p| (a * (2.0 * f64::from(p) - 1.0)) as f32);
    let mut z = vec![0.0f32; x_t.len()];
    crate::noise::fill_standard_normal(&mut rng, &mut z);
    x_t.iter_mut().zip(&z).for_each(|(v, zi)| *v += b as f32 * zi);
    let w = Array4::from_shape_fn(x_t.raw_dim(), |(n, c, i, j)| {
        (((n * 131 + c * 71 + i * 17 + j * 5) % 29) as f32 / 14.0) - 1.0
    });
    let t = plan.t_star();
    let (_, g) = denoiser.eps_vjp(x_t.view(), t, w.view())?;
    let mut f = |x: ArrayView4<f32>| -> Result<f64> {
        let eps = denoiser.predict_eps(x, t)?;
        Ok(eps.iter().zip(&w).map(|(&e, &wi)| f64::from(e) * f64::from(wi)).sum())
    };
    let check = check_gradient(&mut f, x_t.view(), g.view(), coords, h, seed)?;
    out.push(NamedCheck { name: "denoiser".into(), check, replay_error: 0.0 });

    let noise = || {
        SeededNoise::new(
            seed,
            (0..labels.len() as u64).map(|frame| StreamId::of_frame(frame, 0)).collect(),
        )
    };
    let full = super::purifier::purified_loss_grad(
        plan,
        denoiser,
        classifier,
        images,
        labels,
        Loss::CrossEntropy,
        &mut noise(),
    )?;
    // Forward only: the runtime's purifier on the twin, then the classifier and the loss.
    let mut f = |x: ArrayView4<f32>| -> Result<f64> {
        let purified = crate::purify::purify(plan, denoiser, x, &mut noise())?;
        let logits = classifier.logits(purified.view())?;
        let (v, _) = Loss::CrossEntropy.value_and_grad(logits.view(), labels)?;
        Ok(v.iter().map(|&l| f64::from(l)).sum())
    };
    let check = check_gradient(&mut f, images, full.grad.view(), coords, h, seed)?;
    out.push(NamedCheck { name: "purifier".into(), check, replay_error: full.replay_error });
    Ok(out)
}

fn not_contiguous() -> Error {
    Error::Backend("gradient check needs a contiguous input".into())
}

fn set(a: &mut Array4<f32>, i: usize, v: f32) -> Result<()> {
    *a.as_slice_mut().and_then(|s| s.get_mut(i)).ok_or_else(not_contiguous)? = v;
    Ok(())
}

/// `n` distinct indices: the largest |g| entries for half, uniform draws for the rest.
fn pick_coordinates(g: &[f32], n: usize, seed: u64) -> Vec<usize> {
    let n = n.min(g.len());
    let mut by_size: Vec<usize> = (0..g.len()).collect();
    by_size.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let mut chosen: Vec<usize> = by_size[..n / 2].to_vec();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    while chosen.len() < n {
        let i = (rng.next_u64() % g.len() as u64) as usize;
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen
}
