//! Deadline-aware planning: a per-backend cost model and the planner that picks, per frame, how
//! many DDIM steps (a coarser stride at the same T*) and votes fit the latency budget.
//!
//! The cost model keeps fixed-capacity moving windows (heapless), so recording a timing in the
//! frame loop never allocates.

use heapless::HistoryBuf;

/// Timings kept per (operation, batch size).
const WINDOW: usize = 16;
/// Distinct batch sizes tracked per operation; the least recently added is replaced.
const MAX_BATCHES: usize = 8;
/// Fraction of the budget the planner fills, leaving room for timing jitter.
pub const HEADROOM: f64 = 0.9;

/// Moving-average cost of one operation at one batch size.
struct CostWindow {
    batch: usize,
    samples: HistoryBuf<f64, WINDOW>,
}

/// Costs of one operation by batch size.
#[derive(Default)]
struct OpCosts {
    windows: heapless::Vec<CostWindow, MAX_BATCHES>,
}

impl OpCosts {
    fn record(&mut self, batch: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if let Some(w) = self.windows.iter_mut().find(|w| w.batch == batch) {
            w.samples.write(seconds);
            return;
        }
        if self.windows.is_full() {
            self.windows.remove(0);
        }
        let mut samples = HistoryBuf::new();
        samples.write(seconds);
        // Cannot fail: a slot was freed above when full.
        let _ = self.windows.push(CostWindow { batch, samples });
    }

    /// Seconds per call at `batch`: the window's mean, or, for an unseen batch size, the nearest
    /// known size's cost scaled linearly with the batch (convolutions are linear in the batch).
    fn estimate(&self, batch: usize) -> Option<f64> {
        let mean = |w: &CostWindow| w.samples.iter().sum::<f64>() / w.samples.len() as f64;
        if let Some(w) = self.windows.iter().find(|w| w.batch == batch) {
            return Some(mean(w));
        }
        let w = self.windows.iter().min_by_key(|w| w.batch.abs_diff(batch))?;
        Some(mean(w) * batch as f64 / w.batch as f64)
    }
}

/// Measured costs of the backend in use: seconds per denoiser step and per classifier call,
/// by batch size (images in the call).
#[derive(Default)]
pub struct CostModel {
    denoise: OpCosts,
    classify: OpCosts,
}

impl CostModel {
    /// Records one denoiser step over `batch` images that took `seconds`.
    pub fn record_denoise(&mut self, batch: usize, seconds: f64) {
        self.denoise.record(batch, seconds);
    }

    /// Records one classifier call over `batch` images that took `seconds`.
    pub fn record_classify(&mut self, batch: usize, seconds: f64) {
        self.classify.record(batch, seconds);
    }

    /// Estimated seconds of one denoiser step over `batch` images (None before any timing).
    pub fn denoise_s(&self, batch: usize) -> Option<f64> {
        self.denoise.estimate(batch)
    }

    /// Estimated seconds of one classifier call over `batch` images (None before any timing).
    pub fn classify_s(&self, batch: usize) -> Option<f64> {
        self.classify.estimate(batch)
    }

    /// Estimated seconds of a frame purified `votes` times with `steps` DDIM steps.
    pub fn frame_s(&self, steps: usize, votes: u32) -> Option<f64> {
        let b = votes as usize;
        Some(steps as f64 * self.denoise_s(b)? + self.classify_s(b)?)
    }
}

/// What the user lets the planner choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Fewest DDIM steps a frame may be planned with (>= 1).
    pub min_steps: usize,
    /// Most DDIM steps (the configured plan's).
    pub max_steps: usize,
    /// Fewest votes per frame (>= 1).
    pub min_votes: u32,
    /// Most votes per frame.
    pub max_votes: u32,
}

/// A per-frame latency budget and what the planner may choose within it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Seconds allowed for purifying and classifying one frame.
    pub seconds: f64,
    /// Step and vote limits.
    pub limits: BudgetLimits,
}

/// The planner's choice for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FramePlan {
    /// DDIM steps from T* to 0.
    pub steps: usize,
    /// Purifications of the frame.
    pub votes: u32,
    /// Predicted seconds for the frame.
    pub predicted_s: f64,
}

/// The most purification that fits `budget_s` (times [`HEADROOM`]): as many steps as allowed
/// first (each step sharpens the estimate), then as many votes as still fit. `None` when even
/// the smallest plan does not fit, or before any timing was recorded.
pub fn plan_frame(costs: &CostModel, budget_s: f64, limits: &BudgetLimits) -> Option<FramePlan> {
    let target = budget_s * HEADROOM;
    for steps in (limits.min_steps.max(1)..=limits.max_steps).rev() {
        for votes in (limits.min_votes.max(1)..=limits.max_votes).rev() {
            let predicted_s = costs.frame_s(steps, votes)?;
            if predicted_s <= target {
                return Some(FramePlan { steps, votes, predicted_s });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(step_per_image: f64, classify_per_image: f64) -> CostModel {
        let mut m = CostModel::default();
        for b in [1usize, 4] {
            m.record_denoise(b, step_per_image * b as f64);
            m.record_classify(b, classify_per_image * b as f64);
        }
        m
    }

    #[test]
    fn window_averages_and_extrapolates_linearly() {
        let mut m = CostModel::default();
        m.record_denoise(2, 0.010);
        m.record_denoise(2, 0.020);
        assert!((m.denoise_s(2).unwrap() - 0.015).abs() < 1e-12);
        assert!((m.denoise_s(4).unwrap() - 0.030).abs() < 1e-12);
        assert_eq!(m.classify_s(1), None);
        for _ in 0..100 {
            m.record_denoise(2, 0.040);
        }
        assert!((m.denoise_s(2).unwrap() - 0.040).abs() < 1e-12, "old samples leave the window");
    }

    #[test]
    fn tracks_at_most_max_batches_sizes() {
        let mut m = CostModel::default();
        for b in 1..=(MAX_BATCHES + 3) {
            m.record_classify(b, b as f64);
        }
        assert_eq!(m.classify.windows.len(), MAX_BATCHES);
        assert!((m.classify_s(MAX_BATCHES + 3).unwrap() - (MAX_BATCHES + 3) as f64).abs() < 1e-12);
    }

    #[test]
    fn plan_prefers_steps_then_votes_and_fits_the_budget() {
        let m = model(0.010, 0.005); // 10 ms per step-image, 5 ms per classified image
        let limits = BudgetLimits { min_steps: 1, max_steps: 14, min_votes: 1, max_votes: 4 };
        // 14 steps x 1 vote = 145 ms; 2 votes = 290 ms.
        let p = plan_frame(&m, 0.2, &limits).unwrap();
        assert_eq!((p.steps, p.votes), (14, 1));
        let p = plan_frame(&m, 0.35, &limits).unwrap();
        assert_eq!((p.steps, p.votes), (14, 2));
        assert!(p.predicted_s <= 0.35 * HEADROOM);
        // 50 ms * 0.9 = 45 ms: 4 steps (45 ms) fit, 5 steps (55 ms) do not.
        let p = plan_frame(&m, 0.05, &limits).unwrap();
        assert_eq!((p.steps, p.votes), (4, 1));
        assert!(plan_frame(&m, 0.01, &limits).is_none(), "one step + classifier = 15 ms");
    }

    #[test]
    fn every_plan_fits_for_many_budgets() {
        let m = model(0.0123, 0.0031);
        let limits = BudgetLimits { min_steps: 2, max_steps: 14, min_votes: 1, max_votes: 8 };
        for ms in (1..2000).step_by(7) {
            let budget = ms as f64 / 1e3;
            match plan_frame(&m, budget, &limits) {
                Some(p) => {
                    assert!(p.predicted_s <= budget * HEADROOM);
                    assert!((2..=14).contains(&p.steps) && (1..=8).contains(&p.votes));
                    // Nothing with more steps fits.
                    if p.steps < 14 {
                        assert!(m.frame_s(p.steps + 1, 1).unwrap() > budget * HEADROOM);
                    }
                }
                None => assert!(m.frame_s(2, 1).unwrap() > budget * HEADROOM),
            }
        }
    }
}
