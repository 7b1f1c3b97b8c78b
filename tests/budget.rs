//! The deadline-aware pipeline on a fake backend with known costs: planned steps and votes fit
//! the budget, a frame that runs out of time falls back to its latest x0 estimate, and an
//! impossible budget is refused at calibration.

use diffshield::budget::Budget;
use diffshield::budget::{plan_frame, BudgetLimits};
use diffshield::config::VoteRule;
use diffshield::pipeline::Pipeline;
use diffshield::{Classifier, DdimPlan, Denoiser, PlanSpec, Result, Schedule};
use ndarray::{Array2, Array4, ArrayView4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sleeps `per_image` per image per call, or `slow` once `slow_after` calls were made; predicts
/// eps = 0 (so x0_hat = x_t / sqrt(abar)).
struct SlowDenoiser {
    per_image: Duration,
    calls: Arc<AtomicUsize>,
    slow_after: usize,
    slow: Duration,
}

impl Denoiser for SlowDenoiser {
    fn predict_eps(&mut self, x_t: ArrayView4<f32>, _t: u32) -> Result<Array4<f32>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let d =
            if n >= self.slow_after { self.slow } else { self.per_image * x_t.shape()[0] as u32 };
        std::thread::sleep(d);
        Ok(Array4::zeros(x_t.raw_dim()))
    }
}

struct SlowClassifier {
    per_image: Duration,
}

impl Classifier for SlowClassifier {
    fn logits(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        std::thread::sleep(self.per_image * images.shape()[0] as u32);
        // Class 1 when the mean pixel is above 0.5.
        Ok(Array2::from_shape_fn((images.shape()[0], 2), |(i, c)| {
            let m = images.slice(ndarray::s![i, .., .., ..]).mean().unwrap_or(0.0);
            if (c == 1) == (m > 0.5) {
                1.0
            } else {
                0.0
            }
        }))
    }
}

fn pipeline(step_ms: u64, slow_after: usize, slow_ms: u64) -> (Pipeline, Arc<AtomicUsize>) {
    let schedule = Schedule::ddpm_linear_1000();
    let plan = DdimPlan::new(&schedule, 1..=500, 100, &PlanSpec::Stride(10), 1.0).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let den = SlowDenoiser {
        per_image: Duration::from_millis(step_ms),
        calls: calls.clone(),
        slow_after,
        slow: Duration::from_millis(slow_ms),
    };
    let clf = SlowClassifier { per_image: Duration::from_millis(2) };
    let p = Pipeline::new(
        schedule,
        1..=500,
        plan,
        Box::new(den),
        Box::new(clf),
        vec!["dark".into(), "bright".into()],
        1,
        VoteRule::Majority,
        0,
    )
    .unwrap();
    (p, calls)
}

fn frame() -> Array4<f32> {
    Array4::from_elem((1, 1, 4, 4), 0.8)
}

const LIMITS: BudgetLimits =
    BudgetLimits { min_steps: 1, max_steps: 10, min_votes: 1, max_votes: 3 };

#[test]
fn planned_steps_and_votes_fit_the_budget() {
    // 10 ms per step-image, 2 ms per classified image; sleeps overrun a little on a busy
    // machine, so the measured costs (and the plans) may come out a step smaller.
    let (mut p, _) = pipeline(10, usize::MAX, 0);
    for (ms, want_steps) in [(80u64, 7usize), (40, 3)] {
        let budget = Budget { seconds: ms as f64 / 1e3, limits: LIMITS };
        p.calibrate(&budget, [1, 4, 4]).unwrap();
        // The plan is exactly the planner's choice on the measured costs ...
        let expected = plan_frame(p.costs(), budget.seconds, &LIMITS).unwrap();
        let d = p.decide_within(frame().view(), 0, &budget).unwrap();
        assert_eq!((d.planned_steps, d.vote_labels.len() as u32), (expected.steps, expected.votes));
        let votes = d.vote_labels.len();
        let predicted = d.planned_steps as f64 * 10.0 * votes as f64 + 2.0 * votes as f64;
        eprintln!(
            "{ms} ms: {} steps x {votes} votes, predicted {predicted} ms, took {:.1} ms",
            d.planned_steps,
            d.purify_ms + d.classify_ms
        );
        assert!(d.planned_steps <= want_steps, "{ms} ms budget planned {} steps", d.planned_steps);
        assert!(
            d.planned_steps + 1 >= want_steps,
            "{ms} ms budget planned only {} steps",
            d.planned_steps
        );
        assert_eq!(votes, 1, "a second vote does not fit {ms} ms");
        assert!(predicted <= ms as f64, "plan does not fit: {predicted} ms > {ms} ms");
        assert!(d.steps == d.planned_steps || d.anytime, "{d:?}");
        assert_eq!(d.label, Some(1));
    }
    // 400 ms fits all 10 steps with 3 votes (10*30 + 6 = 306 ms < 360 ms).
    let budget = Budget { seconds: 0.4, limits: LIMITS };
    let d = p.decide_within(frame().view(), 1, &budget).unwrap();
    assert_eq!((d.planned_steps, d.vote_labels.len()), (10, 3));
    assert_eq!(d.deadline_met, Some(true));
}

#[test]
fn a_frame_out_of_time_is_classified_from_its_latest_estimate() {
    // Calibration makes 20 denoiser calls (2 vote levels x 5 runs x 2 steps); the frame's first
    // two steps are fast, then every call takes 60 ms.
    let (mut p, calls) = pipeline(5, 22, 60);
    let budget = Budget { seconds: 0.1, limits: BudgetLimits { max_votes: 1, ..LIMITS } };
    p.calibrate(&budget, [1, 4, 4]).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    let d = p.decide_within(frame().view(), 0, &budget).unwrap();
    assert_eq!(d.planned_steps, 10);
    assert!(d.anytime, "{d:?}");
    assert!(d.steps >= 2 && d.steps < 10, "ran {} steps", d.steps);
    assert_eq!(d.label, Some(1), "the x0 estimate still carries the frame");
}

#[test]
fn an_impossible_budget_is_refused_at_calibration() {
    let (mut p, _) = pipeline(20, usize::MAX, 0);
    let budget = Budget { seconds: 0.01, limits: LIMITS };
    let err = p.calibrate(&budget, [1, 4, 4]).unwrap_err().to_string();
    assert!(err.contains("cannot fit even 1 DDIM step"), "{err}");
}

#[test]
fn budget_mode_takes_one_frame_at_a_time() {
    let (mut p, _) = pipeline(1, usize::MAX, 0);
    let budget = Budget { seconds: 1.0, limits: LIMITS };
    let two = Array4::from_elem((2, 1, 4, 4), 0.2);
    assert!(p.decide_within(two.view(), 0, &budget).is_err());
}
