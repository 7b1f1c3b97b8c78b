//! The one DDIM step of the paper's Algorithm 2, and the map between \[0,1\] pixels and the
//! denoiser's \[-1,1\] diffusion space. Both live only here: the purifier (forward) and the
//! purifier gradient (replay and backward pass) call these pure functions of (coefficients,
//! x_t, eps, z), so the two can never drift apart.
//!
//! Every function is elementwise over NCHW f32 arrays with the coefficients of one
//! [`StepCoeffs`] cast to f32 once; the order of the f32 operations is fixed (no fused
//! multiply-add), which the golden vectors and the gradient's replay check rely on.

use crate::schedule::StepCoeffs;
use ndarray::{Array4, ArrayView4, Zip};

/// One step's coefficients as the f32 values that multiply tensors.
#[derive(Debug, Clone, Copy)]
struct F32Step {
    sqrt_abar_t: f32,
    sqrt_one_minus_abar_t: f32,
    sqrt_abar_s: f32,
    dir: f32,
    sigma: f32,
}

impl From<&StepCoeffs> for F32Step {
    fn from(c: &StepCoeffs) -> Self {
        Self {
            sqrt_abar_t: c.sqrt_abar_t as f32,
            sqrt_one_minus_abar_t: c.sqrt_one_minus_abar_t as f32,
            sqrt_abar_s: c.sqrt_abar_s as f32,
            dir: c.dir_coeff as f32,
            sigma: c.sigma as f32,
        }
    }
}

impl F32Step {
    /// The x0 estimate before clipping: (x_t - sqrt(1-abar(t)) eps) / sqrt(abar(t)).
    fn x0_unclipped(&self, x: f32, e: f32) -> f32 {
        (x - self.sqrt_one_minus_abar_t * e) / self.sqrt_abar_t
    }

    /// (x_s before the fresh noise, clipped x0 estimate).
    fn deterministic(&self, x: f32, e: f32) -> (f32, f32) {
        let x0 = self.x0_unclipped(x, e).clamp(-1.0, 1.0);
        (self.sqrt_abar_s * x0 + self.dir * e, x0)
    }
}

/// What one DDIM step produces.
#[derive(Debug, Clone)]
pub(crate) struct StepOutput {
    /// The next state x_s (diffusion space, fresh noise included).
    pub x_s: Array4<f32>,
    /// The clipped x0 estimate of this step (diffusion space, in \[-1,1\]).
    pub x0_hat: Array4<f32>,
}

/// Whether the step injects fresh noise (sigma > 0). A step without it consumes no draw, as
/// the golden vectors expect (eta = 0, or the last step of any plan).
pub(crate) fn needs_noise(c: &StepCoeffs) -> bool {
    F32Step::from(c).sigma > 0.0
}

/// One DDIM step from t to s: x0_hat = clip((x_t - sqrt(1-abar(t)) eps) / sqrt(abar(t)), -1, 1),
/// x_s = sqrt(abar(s)) x0_hat + sqrt(max(0, 1-abar(s)-sigma^2)) eps + sigma z. `z` (standard
/// normal, same shape) is required exactly when [`needs_noise`] and ignored otherwise.
pub(crate) fn step(
    c: &StepCoeffs,
    x_t: ArrayView4<f32>,
    eps: ArrayView4<f32>,
    z: Option<ArrayView4<f32>>,
) -> StepOutput {
    let k = F32Step::from(c);
    let mut x_s = Array4::<f32>::zeros(x_t.raw_dim());
    let mut x0_hat = Array4::<f32>::zeros(x_t.raw_dim());
    Zip::from(&mut x_s).and(&mut x0_hat).and(x_t).and(eps).for_each(|xs, x0, &x, &e| {
        (*xs, *x0) = k.deterministic(x, e);
    });
    if let (true, Some(z)) = (k.sigma > 0.0, z) {
        Zip::from(&mut x_s).and(z).for_each(|xs, &zi| *xs += k.sigma * zi);
    }
    StepOutput { x_s, x0_hat }
}

/// The vector-Jacobian product of [`step`] with respect to its two inputs: given the cotangent
/// `g_s` of x_s, returns (the cotangent of x_t through the x0 estimate, the cotangent of eps).
/// The clip passes the gradient on \[-1,1\] inclusive; the noise term has no input gradient.
pub(crate) fn step_vjp(
    c: &StepCoeffs,
    x_t: ArrayView4<f32>,
    eps: ArrayView4<f32>,
    g_s: ArrayView4<f32>,
) -> (Array4<f32>, Array4<f32>) {
    let k = F32Step::from(c);
    let mut g_x = Array4::<f32>::zeros(x_t.raw_dim());
    let mut g_eps = Array4::<f32>::zeros(x_t.raw_dim());
    Zip::from(&mut g_eps).and(&mut g_x).and(g_s).and(x_t).and(eps).for_each(
        |ge, gx, &g, &x, &e| {
            let inside = (-1.0..=1.0).contains(&k.x0_unclipped(x, e));
            let g_x0 = if inside { k.sqrt_abar_s * g } else { 0.0 };
            *gx = g_x0 / k.sqrt_abar_t;
            *ge = k.dir * g - k.sqrt_one_minus_abar_t / k.sqrt_abar_t * g_x0;
        },
    );
    (g_x, g_eps)
}

/// Noises \[0,1\] `pixels` to x_{T*} = a (2 pixels - 1) + b z, with (a, b) =
/// [`crate::schedule::DdimPlan::start_coeffs`].
pub(crate) fn noise_to_start(
    (a, b): (f64, f64),
    pixels: ArrayView4<f32>,
    z: ArrayView4<f32>,
) -> Array4<f32> {
    let (a, b) = (a as f32, b as f32);
    Zip::from(pixels).and(z).map_collect(|&p, &zi| a * (2.0 * p - 1.0) + b * zi)
}

/// The cotangent of the input pixels from that of x_{T*} (the noise has none): 2a g.
pub(crate) fn noise_to_start_vjp((a, _): (f64, f64), g_start: ArrayView4<f32>) -> Array4<f32> {
    let a = a as f32;
    g_start.mapv(|g| 2.0 * a * g)
}

/// Diffusion space to \[0,1\] pixels: clip((x + 1) / 2, 0, 1).
pub(crate) fn to_pixels(x: ArrayView4<f32>) -> Array4<f32> {
    x.mapv(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
}

/// The cotangent of x from that of `to_pixels(x)`: g / 2 where x is in \[-1,1\] (the clip passes
/// the gradient at its bounds), 0 outside.
pub(crate) fn to_pixels_vjp(x: ArrayView4<f32>, g_pixels: ArrayView4<f32>) -> Array4<f32> {
    Zip::from(g_pixels)
        .and(x)
        .map_collect(|&g, &v| if (-1.0..=1.0).contains(&v) { 0.5 * g } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{DdimPlan, PlanSpec, Schedule};

    fn coeffs(eta: f64) -> StepCoeffs {
        let plan =
            DdimPlan::new(&Schedule::ddpm_linear_1000(), 1..=500, 140, &PlanSpec::Stride(10), eta)
                .unwrap();
        plan.steps()[0]
    }

    fn arr(values: &[f32]) -> Array4<f32> {
        Array4::from_shape_vec((1, 1, 1, values.len()), values.to_vec()).unwrap()
    }

    #[test]
    fn step_matches_the_model_cards_formula_in_f64() {
        let c = coeffs(1.0);
        let (x, e, z) = (arr(&[0.3, -2.5, 1.9]), arr(&[0.1, -0.4, 2.0]), arr(&[0.5, -1.0, 0.0]));
        let out = step(&c, x.view(), e.view(), Some(z.view()));
        for i in 0..3 {
            let (xv, ev, zv) = (
                f64::from(x[[0, 0, 0, i]]),
                f64::from(e[[0, 0, 0, i]]),
                f64::from(z[[0, 0, 0, i]]),
            );
            let x0 = ((xv - c.sqrt_one_minus_abar_t * ev) / c.sqrt_abar_t).clamp(-1.0, 1.0);
            let xs = c.sqrt_abar_s * x0 + c.dir_coeff * ev + c.sigma * zv;
            assert!((f64::from(out.x0_hat[[0, 0, 0, i]]) - x0).abs() < 1e-6);
            assert!((f64::from(out.x_s[[0, 0, 0, i]]) - xs).abs() < 1e-6);
        }
        assert!(needs_noise(&c) && !needs_noise(&coeffs(0.0)));
    }

    #[test]
    fn vjps_match_central_differences() {
        let c = coeffs(1.0);
        let (x, e) = (arr(&[0.3, 0.05]), arr(&[0.1, -0.2]));
        let g = arr(&[1.0, -0.7]);
        let (gx, ge) = step_vjp(&c, x.view(), e.view(), g.view());
        let loss = |x: &Array4<f32>, e: &Array4<f32>| {
            let s = step(&c, x.view(), e.view(), None).x_s;
            f64::from((&s * &g).sum())
        };
        let h = 1e-3f32;
        for i in 0..2 {
            let bump = |a: &Array4<f32>, d: f32| {
                let mut b = a.clone();
                b[[0, 0, 0, i]] += d;
                b
            };
            let dx = (loss(&bump(&x, h), &e) - loss(&bump(&x, -h), &e)) / (2.0 * f64::from(h));
            let de = (loss(&x, &bump(&e, h)) - loss(&x, &bump(&e, -h))) / (2.0 * f64::from(h));
            assert!((dx - f64::from(gx[[0, 0, 0, i]])).abs() < 2e-2 * dx.abs().max(1.0), "{dx}");
            assert!((de - f64::from(ge[[0, 0, 0, i]])).abs() < 2e-2 * de.abs().max(1.0), "{de}");
        }
        let p = arr(&[-1.5, -1.0, 0.0, 1.0, 1.2]);
        let gp = to_pixels_vjp(p.view(), arr(&[1.0; 5]).view());
        assert_eq!(gp.iter().copied().collect::<Vec<_>>(), vec![0.0, 0.5, 0.5, 0.5, 0.0]);
        let start = noise_to_start((0.9, 0.4), arr(&[0.0, 1.0]).view(), arr(&[1.0, 0.0]).view());
        assert_eq!(start.iter().copied().collect::<Vec<_>>(), vec![-0.9 + 0.4, 0.9]);
        assert_eq!(noise_to_start_vjp((0.9, 0.4), arr(&[1.0]).view())[[0, 0, 0, 0]], 1.8);
    }
}
