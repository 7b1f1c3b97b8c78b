//! The gradients the PGD modes follow. Every stochastic one averages over `eot` purification
//! samples (Expectation over Transformation), each with its own reproducible noise stream keyed
//! by (attack seed, image, PGD iteration * eot + sample).

use super::pgd::LossGradient;
use crate::backend::Denoiser;
use crate::error::{Error, Result};
use crate::grad::purifier::purified_loss_grad;
use crate::grad::{classifier_loss_grad, DifferentiableClassifier, DifferentiableDenoiser, Loss};
use crate::noise::{NoiseDomain, SeededNoise, StreamId};
use crate::purify::purify;
use crate::schedule::DdimPlan;
use ndarray::{concatenate, Array4, ArrayView4, Axis};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which gradient an attack follows and what it is evaluated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackMode {
    /// Attack the bare classifier, evaluate the bare classifier.
    Undefended,
    /// Attack the bare classifier, evaluate the defended pipeline (the defence is unknown to
    /// the attacker).
    GreyBox,
    /// Backward pass through the purifier as the identity (BPDA), the classifier's gradient at
    /// the purified image, averaged over EOT samples.
    Bpda,
    /// The exact gradient through every DDIM step, averaged over EOT samples.
    WhiteBox,
    /// An ablation: the exact gradient through the very purifications the evaluation then
    /// uses (its seed, domain and votes), i.e. the defence's randomness known to the attacker.
    /// Evaluated with that same noise in every run.
    KnownNoise,
}

impl AttackMode {
    /// Every mode, in report order.
    pub const ALL: [AttackMode; 5] = [
        AttackMode::Undefended,
        AttackMode::GreyBox,
        AttackMode::Bpda,
        AttackMode::WhiteBox,
        AttackMode::KnownNoise,
    ];

    /// Its place in [`AttackMode::ALL`] (keys its cells' noise domains).
    pub fn index(self) -> usize {
        AttackMode::ALL.iter().position(|&m| m == self).unwrap_or(0)
    }

    /// Whether it needs the differentiable twin of the denoiser.
    pub fn needs_denoiser_twin(self) -> bool {
        matches!(self, AttackMode::WhiteBox | AttackMode::KnownNoise)
    }

    /// Whether the adversarial images are evaluated through the purifier.
    pub fn evaluates_defended(self) -> bool {
        self != AttackMode::Undefended
    }
}

impl fmt::Display for AttackMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttackMode::Undefended => "undefended",
            AttackMode::GreyBox => "grey-box",
            AttackMode::Bpda => "bpda",
            AttackMode::WhiteBox => "white-box",
            AttackMode::KnownNoise => "known-noise",
        })
    }
}

impl FromStr for AttackMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        AttackMode::ALL.into_iter().find(|m| m.to_string() == s.trim()).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "attack mode {s:?}: expected undefended, grey-box, bpda, white-box or known-noise"
            ))
        })
    }
}

/// The bare classifier's loss gradient (undefended and grey-box modes).
pub struct ClassifierGradient<'a> {
    /// The differentiable classifier.
    pub classifier: &'a mut dyn DifferentiableClassifier,
    /// Loss to ascend.
    pub loss: Loss,
}

impl LossGradient for ClassifierGradient<'_> {
    fn loss_grad(&mut self, x: ArrayView4<f32>, labels: &[usize], _: usize) -> Result<Array4<f32>> {
        Ok(classifier_loss_grad(self.classifier, x, labels, self.loss)?.1)
    }

    fn loss_values_and_grad(
        &mut self,
        x: ArrayView4<f32>,
        labels: &[usize],
        _: usize,
    ) -> Result<(Vec<f32>, Array4<f32>)> {
        classifier_loss_grad(self.classifier, x, labels, self.loss)
    }
}

/// Where the EOT samples' noise comes from: the streams of [`NoiseDomain::AttackEot`] of the
/// attack's cell, one frame per image, one vote per (PGD iteration, sample); or, `known`, the
/// streams of evaluation run 0 of the cell, one vote per sample, the same at every iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EotNoise {
    /// Seed of the attack's noise streams.
    pub seed: u64,
    /// Purification samples per gradient.
    pub eot: u32,
    /// Frame index of the first image of the batch (its streams are frame, frame + 1, ...).
    pub first_frame: u64,
    /// The attack cell (keeps the EOT streams of different cells apart).
    pub cell: u32,
    /// The attack's place in the cell (keeps the streams of a cell's attacks apart).
    pub attack: u32,
    /// Use the evaluation's own noise (the known-noise ablation; `seed` is then the
    /// pipeline's and `eot` its votes).
    pub known: bool,
}

impl EotNoise {
    /// The batch of `n` images repeated `eot` times (sample-major), and the noise of
    /// iteration `iteration` for it.
    fn replicate(
        &self,
        x: ArrayView4<f32>,
        iteration: usize,
    ) -> Result<(Array4<f32>, SeededNoise)> {
        if self.eot == 0 {
            return Err(Error::InvalidConfig("EOT needs at least one sample".into()));
        }
        let n = x.shape()[0];
        let copies: Vec<_> = (0..self.eot).map(|_| x).collect();
        let batch = concatenate(Axis(0), &copies).map_err(|e| Error::Backend(e.to_string()))?;
        let items = (0..self.eot)
            .flat_map(|e| {
                (0..n).map(move |i| {
                    let frame = self.first_frame + i as u64;
                    if self.known {
                        let domain = NoiseDomain::Evaluation { cell: self.cell, run: 0 };
                        StreamId { domain, frame, vote: e }
                    } else {
                        let domain =
                            NoiseDomain::AttackEot { cell: self.cell, attack: self.attack };
                        StreamId { domain, frame, vote: iteration as u32 * self.eot + e }
                    }
                })
            })
            .collect();
        Ok((batch, SeededNoise::new(self.seed, items)))
    }

    fn labels(&self, labels: &[usize]) -> Vec<usize> {
        (0..self.eot).flat_map(|_| labels.iter().copied()).collect()
    }

    /// Mean over the `eot` sample-major copies of per-image values.
    fn average_values(&self, v: &[f32], n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (0..self.eot as usize)
                    .map(|e| v.get(e * n + i).copied().unwrap_or(0.0))
                    .sum::<f32>()
                    / self.eot as f32
            })
            .collect()
    }

    /// Mean over the `eot` sample-major copies of a replicated gradient.
    fn average(&self, g: Array4<f32>, n: usize) -> Array4<f32> {
        let mut sum = Array4::<f32>::zeros(g.slice(ndarray::s![..n, .., .., ..]).raw_dim());
        for e in 0..self.eot as usize {
            sum += &g.slice(ndarray::s![e * n..(e + 1) * n, .., .., ..]);
        }
        sum / self.eot as f32
    }
}

/// BPDA + EOT: purify (forward only, any denoiser), take the classifier's gradient at the
/// purified images, pass it straight back as if the purifier were the identity.
pub struct BpdaGradient<'a> {
    /// The DDIM plan of the deployed purifier.
    pub plan: &'a DdimPlan,
    /// Denoiser for the forward purification (the deployed one will do: no gradient needed).
    pub denoiser: &'a mut dyn Denoiser,
    /// The differentiable classifier.
    pub classifier: &'a mut dyn DifferentiableClassifier,
    /// EOT noise streams.
    pub noise: EotNoise,
    /// Loss to ascend.
    pub loss: Loss,
}

impl LossGradient for BpdaGradient<'_> {
    fn loss_grad(&mut self, x: ArrayView4<f32>, labels: &[usize], k: usize) -> Result<Array4<f32>> {
        Ok(self.loss_values_and_grad(x, labels, k)?.1)
    }

    fn loss_values_and_grad(
        &mut self,
        x: ArrayView4<f32>,
        labels: &[usize],
        k: usize,
    ) -> Result<(Vec<f32>, Array4<f32>)> {
        let (batch, mut noise) = self.noise.replicate(x, k)?;
        let purified = purify(self.plan, self.denoiser, batch.view(), &mut noise)?;
        let labels = self.noise.labels(labels);
        let (v, g) = classifier_loss_grad(self.classifier, purified.view(), &labels, self.loss)?;
        let n = x.shape()[0];
        Ok((self.noise.average_values(&v, n), self.noise.average(g, n)))
    }
}

/// White-box + EOT: the exact gradient through the whole purifier, averaged over samples.
pub struct WhiteBoxGradient<'a> {
    /// The DDIM plan of the deployed purifier.
    pub plan: &'a DdimPlan,
    /// Differentiable twin of the deployed denoiser.
    pub denoiser: &'a mut dyn DifferentiableDenoiser,
    /// Differentiable twin of the deployed classifier.
    pub classifier: &'a mut dyn DifferentiableClassifier,
    /// EOT noise streams.
    pub noise: EotNoise,
    /// Loss to ascend.
    pub loss: Loss,
    /// Largest replay error seen so far (0 when every recomputed step matched exactly).
    pub replay_error: f32,
}

impl LossGradient for WhiteBoxGradient<'_> {
    fn loss_grad(&mut self, x: ArrayView4<f32>, labels: &[usize], k: usize) -> Result<Array4<f32>> {
        Ok(self.loss_values_and_grad(x, labels, k)?.1)
    }

    fn loss_values_and_grad(
        &mut self,
        x: ArrayView4<f32>,
        labels: &[usize],
        k: usize,
    ) -> Result<(Vec<f32>, Array4<f32>)> {
        let (batch, mut noise) = self.noise.replicate(x, k)?;
        let labels = self.noise.labels(labels);
        let out = purified_loss_grad(
            self.plan,
            self.denoiser,
            self.classifier,
            batch.view(),
            &labels,
            self.loss,
            &mut noise,
        )?;
        self.replay_error = self.replay_error.max(out.replay_error);
        let n = x.shape()[0];
        Ok((self.noise.average_values(&out.loss, n), self.noise.average(out.grad, n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known-noise ablation is only an ablation if the attacker's samples are the very
    /// purifications of evaluation run 0 (`Pipeline::decide_in` keys vote v of frame f as
    /// `{Evaluation { cell, run: 0 }, f, v}`), at every iteration.
    #[test]
    fn known_noise_samples_are_the_evaluations_purifications() {
        let noise = EotNoise { seed: 7, eot: 2, first_frame: 5, cell: 3, attack: 1, known: true };
        let x = Array4::<f32>::zeros((2, 3, 4, 4));
        let (batch, a) = noise.replicate(x.view(), 0).unwrap();
        let (_, b) = noise.replicate(x.view(), 9).unwrap();
        assert_eq!(batch.shape()[0], 4);
        assert_eq!(a.items(), b.items(), "the same noise at every iteration");
        let domain = NoiseDomain::Evaluation { cell: 3, run: 0 };
        let mut want: Vec<StreamId> = (0..2)
            .flat_map(|vote| (5..7).map(move |frame| StreamId { domain, frame, vote }))
            .collect();
        assert_eq!(a.items(), want.as_slice());
        // Fresh EOT noise differs per iteration and per attack.
        let fresh = EotNoise { known: false, ..noise };
        let (_, c) = fresh.replicate(x.view(), 0).unwrap();
        let (_, d) = fresh.replicate(x.view(), 1).unwrap();
        let (_, e) = EotNoise { attack: 2, ..fresh }.replicate(x.view(), 0).unwrap();
        assert_ne!(c.items(), d.items());
        assert_ne!(c.items(), e.items());
        want.iter_mut().for_each(|w| w.domain = NoiseDomain::AttackEot { cell: 3, attack: 1 });
        assert_eq!(c.items(), want.as_slice());
    }
}
