//! Protocol presets for `attack`: the seed paper's Table 2 and the field's strict protocol for
//! randomised defences. A preset fills every setting of a [`super::suite::Suite`] that the
//! caller does not give; the report records the preset's name and everything that actually ran.

use super::gradients::AttackMode;
use super::harness::AttackSpec;
use super::AttackKind;
use super::{Norm, ThreatModel};
use crate::error::{Error, Result};
use crate::grad::Loss;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A named protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The seed paper's Table 2 (Blau et al. 2022): Linf 8/255 and 16/255, L2 1 and 2;
    /// grey-box, BPDA + EOT and white-box + EOT; reported per threat model with AwT and AoA.
    /// The attack settings are this tool's defaults (PGD-20, EOT 8, 5 runs).
    Paper,
    /// The strict protocol for randomised defences: exact gradients through every DDIM step,
    /// AutoAttack-rand (APGD-CE + APGD-DLR, 100 steps) and PGD-200 (step 0.007, Lee & Kim
    /// 2023), both with EOT 20, per image the worst of all attacks; 10 fresh-noise runs, so
    /// the report gives one-shot, worst-of-10 and majority-of-10; a known-noise ablation; a
    /// one-step PGD and an unbounded-eps probe for the sanity checks.
    Strict,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Paper => "paper",
            Protocol::Strict => "strict",
        })
    }
}

impl FromStr for Protocol {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "paper" => Ok(Protocol::Paper),
            "strict" => Ok(Protocol::Strict),
            _ => Err(Error::InvalidConfig(format!("protocol {s:?}: expected paper or strict"))),
        }
    }
}

/// Every setting a protocol fixes.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Threat models, in report order.
    pub threats: Vec<ThreatModel>,
    /// Modes, in report order.
    pub modes: Vec<AttackMode>,
    /// The attacks; per image the worst counts.
    pub attacks: Vec<AttackSpec>,
    /// Purifications averaged per gradient.
    pub eot: u32,
    /// Fresh-noise evaluation runs per image.
    pub runs: u32,
    /// Run the unbounded-eps probe.
    pub unbounded_probe: bool,
}

impl Protocol {
    /// The protocol's settings.
    pub fn preset(self) -> Preset {
        match self {
            Protocol::Paper => Preset {
                threats: ThreatModel::paper_defaults(),
                modes: vec![AttackMode::GreyBox, AttackMode::Bpda, AttackMode::WhiteBox],
                attacks: vec![AttackSpec::pgd(20, None, Loss::CrossEntropy, true)],
                eot: 8,
                runs: 5,
                unbounded_probe: false,
            },
            Protocol::Strict => Preset {
                threats: vec![ThreatModel { norm: Norm::Linf, eps: 8.0 / 255.0 }],
                modes: vec![AttackMode::WhiteBox, AttackMode::KnownNoise],
                attacks: vec![
                    AttackSpec::aa_rand(100),
                    AttackSpec::pgd(200, Some(0.007), Loss::CrossEntropy, true),
                    // One step of eps from the clean image (FGSM): the iterative attacks must
                    // do at least as well.
                    AttackSpec::pgd(1, None, Loss::CrossEntropy, false),
                ],
                eot: 20,
                runs: 10,
                unbounded_probe: true,
            },
        }
    }
}

/// Sets the step count of every iterative gradient attack (a one-step attack stays one step).
pub fn override_steps(attacks: &mut [AttackSpec], steps: usize) {
    for a in attacks.iter_mut().filter(|a| a.uses_gradient() && a.steps.unwrap_or(0) != 1) {
        a.steps = Some(steps);
    }
}

/// Sets the step size of every iterative PGD.
pub fn override_step_size(attacks: &mut [AttackSpec], step_size: f64) {
    for a in
        attacks.iter_mut().filter(|a| a.kind == super::AttackKind::Pgd && a.steps.unwrap_or(0) != 1)
    {
        a.step_size = Some(step_size);
    }
}

/// Sets the loss of every PGD and APGD (square and aa-rand choose their own). Returns how
/// many attacks it set: 0 means the loss would not be used.
pub fn override_loss(attacks: &mut [AttackSpec], loss: Loss) -> usize {
    let mut set = 0;
    for a in attacks.iter_mut().filter(|a| matches!(a.kind, AttackKind::Pgd | AttackKind::Apgd)) {
        a.loss = Some(loss);
        set += 1;
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_overrides_pgd_and_apgd_only() {
        let mut strict = Protocol::Strict.preset().attacks;
        assert_eq!(override_loss(&mut strict, Loss::Dlr), 2, "PGD-200 and the one-step PGD");
        let losses: Vec<_> = strict.iter().map(|a| a.loss).collect();
        assert_eq!(losses, [None, Some(Loss::Dlr), Some(Loss::Dlr)], "aa-rand keeps CE + DLR");
        let mut mixed = vec![AttackSpec::square(10), AttackSpec::apgd(5, Loss::CrossEntropy)];
        assert_eq!(override_loss(&mut mixed, Loss::Margin), 1);
        assert_eq!((mixed[0].loss, mixed[1].loss), (None, Some(Loss::Margin)));
        assert_eq!(
            override_loss(&mut [AttackSpec::square(10), AttackSpec::aa_rand(5)], Loss::Dlr),
            0
        );
    }

    #[test]
    fn strict_is_the_documented_protocol_and_overrides_keep_the_one_step_attack() {
        let p = Protocol::Strict.preset();
        assert_eq!((p.eot, p.runs, p.unbounded_probe), (20, 10, true));
        assert_eq!(p.modes, vec![AttackMode::WhiteBox, AttackMode::KnownNoise]);
        let kinds: Vec<_> = p.attacks.iter().map(|a| (a.kind, a.steps)).collect();
        assert_eq!(
            kinds,
            vec![
                (AttackKind::AaRand, Some(100)),
                (AttackKind::Pgd, Some(200)),
                (AttackKind::Pgd, Some(1))
            ]
        );
        let mut a = p.attacks.clone();
        override_steps(&mut a, 5);
        override_step_size(&mut a, 0.01);
        assert_eq!(a[0].steps, Some(5));
        assert_eq!((a[1].steps, a[1].step_size), (Some(5), Some(0.01)));
        assert_eq!((a[2].steps, a[2].step_size), (Some(1), None), "the one-step attack stays");
        assert_eq!(Protocol::Paper.preset().threats.len(), 4);
        assert!("strict".parse::<Protocol>().is_ok() && "loose".parse::<Protocol>().is_err());
    }
}
