//! Exact input gradients for the white-box attacks.
//!
//! The deployed engine (tract) has no reverse mode, so the attacks run on a differentiable
//! *twin* of each network, loaded from the same ONNX file. The twins sit behind two narrow traits
//! (forward + vector-Jacobian product with respect to the input), so a CUDA twin can replace the
//! CPU one without the purifier gradient or the attacks noticing. [`purifier`] chains them through
//! every DDIM step with the forward noise replayed exactly; [`check`] compares any of them with
//! central finite differences.

pub mod check;
pub mod purifier;

#[cfg(feature = "twin")]
pub mod burn_twin;
#[cfg(feature = "twin")]
mod twin_weights;

use crate::backend::{Classifier, Denoiser};
use crate::error::{Error, Result};
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

/// Where the twins compute: burn's pure-Rust `flex` backend on the CPU, or burn's `wgpu`
/// backend (WGSL shaders on Vulkan, Metal or DX12: any GPU, Jetson Orin included, or Mesa's
/// lavapipe on a CPU). Only the gradients move; final accuracies are always measured on the
/// deployed backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradDevice {
    /// burn `flex` on the CPU.
    #[default]
    Cpu,
    /// burn `wgpu` (feature `wgpu`).
    Wgpu,
}

impl std::fmt::Display for GradDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GradDevice::Cpu => "cpu",
            GradDevice::Wgpu => "wgpu",
        })
    }
}

impl std::str::FromStr for GradDevice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(GradDevice::Cpu),
            "wgpu" => Ok(GradDevice::Wgpu),
            _ => Err(Error::InvalidConfig(format!("gradient device {s:?}: expected cpu or wgpu"))),
        }
    }
}

/// The differentiable twin of the manifest's classifier of `role` on `device`, where this
/// build has twins (feature `twin`); `None` without them.
pub fn load_classifier_twin(
    manifest: &crate::manifest::Manifest,
    role: crate::manifest::ClassifierRole,
    device: GradDevice,
) -> Result<Option<Box<dyn DifferentiableClassifier>>> {
    #[cfg(feature = "twin")]
    {
        Ok(Some(Box::new(burn_twin::TwinClassifier::load_role(manifest, role, device)?)))
    }
    #[cfg(not(feature = "twin"))]
    {
        let _ = (manifest, role, device);
        Ok(None)
    }
}

/// The differentiable twin of the manifest's denoiser tier `tier` on `device`, where this build
/// has twins (feature `twin`); `None` without them.
pub fn load_denoiser_twin(
    manifest: &crate::manifest::Manifest,
    tier: &str,
    device: GradDevice,
) -> Result<Option<Box<dyn DifferentiableDenoiser>>> {
    #[cfg(feature = "twin")]
    {
        Ok(Some(Box::new(burn_twin::TwinDenoiser::load_on(manifest, tier, device)?)))
    }
    #[cfg(not(feature = "twin"))]
    {
        let _ = (manifest, tier, device);
        Ok(None)
    }
}

/// A classifier whose logits have an exact input gradient.
pub trait DifferentiableClassifier: Classifier {
    /// Logits (N x classes) of `images` (\[0,1\] pixels, NCHW f32) and the vector-Jacobian
    /// product: the gradient of `sum(c * logits)` with respect to `images`, where
    /// `c = cotangent(logits)`. The cotangent is a function of the logits so that a loss
    /// gradient costs one forward pass, not two.
    fn logits_vjp(
        &mut self,
        images: ArrayView4<f32>,
        cotangent: &mut dyn FnMut(ArrayView2<f32>) -> Result<Array2<f32>>,
    ) -> Result<(Array2<f32>, Array4<f32>)>;
}

/// An eps-prediction denoiser whose output has an exact gradient with respect to `x_t`.
pub trait DifferentiableDenoiser: Denoiser {
    /// eps at (`x_t`, `t`) as [`Denoiser::predict_eps`], and the gradient of
    /// `sum(cotangent * eps)` with respect to `x_t` (t is an integer, not differentiated).
    fn eps_vjp(
        &mut self,
        x_t: ArrayView4<f32>,
        t: u32,
        cotangent: ArrayView4<f32>,
    ) -> Result<(Array4<f32>, Array4<f32>)>;
}

/// The loss an attack maximises, computed per image from its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Cross-entropy of the true label (the PGD default).
    #[default]
    CrossEntropy,
    /// Best other logit minus the true logit (Carlini-Wagner margin; > 0 once misclassified).
    Margin,
    /// Croce & Hein's difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_1 - z_3 + 1e-12)
    /// with z_1 >= z_2 >= z_3 the sorted logits; invariant to shifting and scaling the logits,
    /// so it resists gradient masking by saturated softmax (needs at least 3 classes).
    Dlr,
}

impl Loss {
    /// Per-image loss values and their gradient with respect to the logits.
    pub fn value_and_grad(
        self,
        logits: ArrayView2<f32>,
        labels: &[usize],
    ) -> Result<(Vec<f32>, Array2<f32>)> {
        let (n, k) = logits.dim();
        if labels.len() != n {
            return Err(Error::Backend(format!("{} labels for {n} logit rows", labels.len())));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= k) {
            return Err(Error::InvalidConfig(format!("label {bad} outside 0..{k}")));
        }
        let mut values = Vec::with_capacity(n);
        let mut grad = Array2::zeros((n, k));
        for (i, row) in logits.outer_iter().enumerate() {
            let y = labels[i];
            match self {
                Loss::CrossEntropy => {
                    let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                    values.push(max + sum.ln() - row[y]);
                    for (j, &v) in row.iter().enumerate() {
                        grad[[i, j]] = (v - max).exp() / sum - f32::from(j == y);
                    }
                }
                Loss::Margin => {
                    let (best, other) = best_other(row, y);
                    values.push(other - row[y]);
                    grad[[i, best]] = 1.0;
                    grad[[i, y]] = -1.0;
                }
                Loss::Dlr => {
                    if k < 3 {
                        return Err(Error::InvalidConfig(format!(
                            "the DLR loss needs at least 3 classes, the classifier has {k}"
                        )));
                    }
                    let (m, other) = best_other(row, y);
                    let mut order: Vec<usize> = (0..k).collect();
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                    let (p1, p3) = (order[0], order[2]);
                    let a = row[y] - other;
                    let d = row[p1] - row[p3] + 1e-12;
                    values.push(-a / d);
                    grad[[i, y]] -= 1.0 / d;
                    grad[[i, m]] += 1.0 / d;
                    grad[[i, p1]] += a / (d * d);
                    grad[[i, p3]] -= a / (d * d);
                }
            }
        }
        Ok((values, grad))
    }
}

/// The largest logit other than `y`'s: (its index, its value).
fn best_other(row: ndarray::ArrayView1<f32>, y: usize) -> (usize, f32) {
    row.iter().enumerate().filter(|&(j, _)| j != y).fold((0, f32::NEG_INFINITY), |b, (j, &v)| {
        if v > b.1 {
            (j, v)
        } else {
            b
        }
    })
}

/// Loss of the bare classifier and its gradient with respect to `images` (\[0,1\] pixels).
pub fn classifier_loss_grad(
    classifier: &mut dyn DifferentiableClassifier,
    images: ArrayView4<f32>,
    labels: &[usize],
    loss: Loss,
) -> Result<(Vec<f32>, Array4<f32>)> {
    let mut values = Vec::new();
    let (_, grad) = classifier.logits_vjp(images, &mut |logits| {
        let (v, g) = loss.value_and_grad(logits, labels)?;
        values = v;
        Ok(g)
    })?;
    Ok((values, grad))
}

#[cfg(test)]
mod tests {
    use super::Loss;
    use ndarray::array;

    /// Every loss's gradient against central differences of its value, on logits with ties
    /// broken (a kink would make the difference quotient meaningless).
    #[test]
    fn loss_gradients_match_finite_differences() {
        let logits = array![[1.0f32, 3.5, -0.5, 2.0, 0.25], [0.1, -1.0, 2.2, 1.7, 0.9]];
        let labels = [3, 0];
        for loss in [Loss::CrossEntropy, Loss::Margin, Loss::Dlr] {
            let (_, g) = loss.value_and_grad(logits.view(), &labels).unwrap();
            for i in 0..2 {
                for j in 0..5 {
                    let h = 1e-3f32;
                    let at = |d: f32| {
                        let mut l = logits.clone();
                        l[[i, j]] += d;
                        loss.value_and_grad(l.view(), &labels).unwrap().0[i]
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    assert!(
                        (fd - g[[i, j]]).abs() < 2e-3,
                        "{loss:?} [{i},{j}]: {fd} vs {}",
                        g[[i, j]]
                    );
                }
            }
        }
        // DLR is invariant to shifting and scaling the logits.
        let (v, _) = Loss::Dlr.value_and_grad(logits.view(), &labels).unwrap();
        let scaled = logits.mapv(|z| 3.0 * z + 7.0);
        let (w, _) = Loss::Dlr.value_and_grad(scaled.view(), &labels).unwrap();
        assert!(v.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-5), "{v:?} vs {w:?}");
        assert!(Loss::Dlr.value_and_grad(array![[1.0f32, 2.0]].view(), &[0]).is_err());
    }
}
