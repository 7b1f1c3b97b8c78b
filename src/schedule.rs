//! The DDPM noise schedule and the DDIM sub-sequence plan.
//!
//! One implementation, in f64, shared by the runtime, the attacks and the tests: every
//! per-step coefficient is computed once here and only cast to f32 where it multiplies a tensor.

use crate::error::{Error, Result};
use std::ops::RangeInclusive;

/// Most noising steps a schedule may have (DDPM uses 1000).
pub const MAX_SCHEDULE_STEPS: u32 = 100_000;

/// Cumulative noise levels abar(t) for t = 0..=T of a DDPM schedule (f64).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    abar: Vec<f64>,
}

impl Schedule {
    /// The DDPM linear schedule: beta_s = linspace(beta_start, beta_end, steps)[s-1] for
    /// s = 1..=steps, abar(0) = 1, abar(t) = prod_{s<=t} (1 - beta_s).
    pub fn linear(steps: u32, beta_start: f64, beta_end: f64) -> Result<Self> {
        if !(2..=MAX_SCHEDULE_STEPS).contains(&steps)
            || !(0.0..1.0).contains(&beta_start)
            || !(0.0..1.0).contains(&beta_end)
        {
            return Err(Error::InvalidConfig(format!(
                "linear schedule needs steps in 2..={MAX_SCHEDULE_STEPS} and betas in [0,1): \
                 steps={steps}, beta_start={beta_start}, beta_end={beta_end}"
            )));
        }
        let n = steps as usize;
        let mut abar = Vec::with_capacity(n + 1);
        abar.push(1.0);
        let mut prod = 1.0f64;
        for i in 0..n {
            // numpy's linspace: start + i * (end - start) / (n - 1)
            let beta = beta_start + i as f64 * (beta_end - beta_start) / (n - 1) as f64;
            prod *= 1.0 - beta;
            abar.push(prod);
        }
        Ok(Self { abar })
    }

    /// The schedule of the shipped models (MODEL_CARD.md): linear, 1e-4 to 0.02 over 1000 steps.
    pub fn ddpm_linear_1000() -> Self {
        Self::linear(1000, 1e-4, 0.02).expect("constant parameters are valid")
    }

    /// Number of noising steps T (the largest t with an abar). A schedule always has at least
    /// two steps, so there is no `is_empty`.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        (self.abar.len() - 1) as u32
    }

    /// abar(t); t must be in 0..=T.
    pub fn abar(&self, t: u32) -> f64 {
        self.abar[t as usize]
    }
}

/// How the DDIM sub-sequence below T* is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanSpec {
    /// tau = T*, T*-stride, ..., with 0 appended if the stride does not divide T*.
    Stride(u32),
    /// `n` steps from T* to 0, as evenly spaced as integers allow.
    Steps(u32),
    /// An explicit, strictly decreasing list starting at T*; 0 is appended if missing.
    Timesteps(Vec<u32>),
}

/// Coefficients of one DDIM step from t to s < t (f64, precomputed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoeffs {
    /// Timestep the step starts from (the denoiser's `t`).
    pub t: u32,
    /// Timestep the step lands on.
    pub s: u32,
    /// sqrt(abar(t)).
    pub sqrt_abar_t: f64,
    /// sqrt(1 - abar(t)).
    pub sqrt_one_minus_abar_t: f64,
    /// sqrt(abar(s)).
    pub sqrt_abar_s: f64,
    /// sqrt(max(0, 1 - abar(s) - sigma^2)): weight of the predicted eps in x_s.
    pub dir_coeff: f64,
    /// sigma = eta * sqrt((1-abar(s))/(1-abar(t))) * sqrt(1 - abar(t)/abar(s)): fresh noise.
    pub sigma: f64,
}

/// A DDIM plan: T*, the timestep sequence and every step's coefficients, computed once.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimPlan {
    t_star: u32,
    eta: f64,
    sqrt_abar_start: f64,
    sqrt_one_minus_abar_start: f64,
    timesteps: Vec<u32>,
    steps: Vec<StepCoeffs>,
}

impl DdimPlan {
    /// Builds a plan; `trained` is the denoiser's trained t range (from the manifest), and
    /// T* must lie in it. `eta` in \[0, 1\] scales the fresh noise of every step.
    pub fn new(
        schedule: &Schedule,
        trained: RangeInclusive<u32>,
        t_star: u32,
        spec: &PlanSpec,
        eta: f64,
    ) -> Result<Self> {
        if !trained.contains(&t_star) || t_star > schedule.len() {
            return Err(Error::TStarOutOfRange {
                t_star,
                min: *trained.start(),
                max: (*trained.end()).min(schedule.len()),
            });
        }
        if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
            return Err(Error::InvalidConfig(format!("eta must be in [0, 1], got {eta}")));
        }
        let timesteps = timesteps_for(t_star, spec)?;
        let steps = timesteps.windows(2).map(|w| step_coeffs(schedule, w[0], w[1], eta)).collect();
        let abar_start = schedule.abar(t_star);
        Ok(Self {
            t_star,
            eta,
            sqrt_abar_start: abar_start.sqrt(),
            sqrt_one_minus_abar_start: (1.0 - abar_start).sqrt(),
            timesteps,
            steps,
        })
    }

    /// T*, the diffusion depth the input is noised to.
    pub fn t_star(&self) -> u32 {
        self.t_star
    }

    /// The eta the plan was built with.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The timestep sequence tau = [T*, ..., 0].
    pub fn timesteps(&self) -> &[u32] {
        &self.timesteps
    }

    /// The DDIM steps in order (one denoiser call each).
    pub fn steps(&self) -> &[StepCoeffs] {
        &self.steps
    }

    /// sqrt(abar(T*)) and sqrt(1 - abar(T*)), the weights of the initial noising.
    pub fn start_coeffs(&self) -> (f64, f64) {
        (self.sqrt_abar_start, self.sqrt_one_minus_abar_start)
    }
}

fn step_coeffs(schedule: &Schedule, t: u32, s: u32, eta: f64) -> StepCoeffs {
    let (at, as_) = (schedule.abar(t), schedule.abar(s));
    let sigma = eta * ((1.0 - as_) / (1.0 - at)).sqrt() * (1.0 - at / as_).sqrt();
    StepCoeffs {
        t,
        s,
        sqrt_abar_t: at.sqrt(),
        sqrt_one_minus_abar_t: (1.0 - at).sqrt(),
        sqrt_abar_s: as_.sqrt(),
        dir_coeff: (1.0 - as_ - sigma * sigma).max(0.0).sqrt(),
        sigma,
    }
}

fn timesteps_for(t_star: u32, spec: &PlanSpec) -> Result<Vec<u32>> {
    let mut taus = match spec {
        PlanSpec::Stride(0) => return Err(Error::InvalidPlan("stride must be at least 1".into())),
        PlanSpec::Stride(stride) => (0..=t_star / stride).map(|k| t_star - k * stride).collect(),
        PlanSpec::Steps(0) => return Err(Error::InvalidPlan("steps must be at least 1".into())),
        PlanSpec::Steps(n) if *n > t_star => {
            return Err(Error::InvalidPlan(format!(
                "{n} steps do not fit below T*={t_star} (at most one step per timestep)"
            )))
        }
        PlanSpec::Steps(n) => {
            let n = u64::from(*n);
            // Round to nearest so T*=140, 14 steps gives exactly stride 10.
            (0..=n).map(|k| ((u64::from(t_star) * (n - k) + n / 2) / n) as u32).collect()
        }
        PlanSpec::Timesteps(list) => {
            if list.first() != Some(&t_star) {
                return Err(Error::InvalidPlan(format!(
                    "an explicit timestep list must start at T*={t_star}, got {list:?}"
                )));
            }
            if let Some(w) = list.windows(2).find(|w| w[1] >= w[0]) {
                return Err(Error::InvalidPlan(format!(
                    "timesteps must strictly decrease, got {} then {}",
                    w[0], w[1]
                )));
            }
            list.clone()
        }
    };
    if taus.last() != Some(&0) {
        taus.push(0);
    }
    Ok(taus)
}
