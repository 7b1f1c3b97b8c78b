//! The DDPM schedule and the DDIM plan against values computed independently with numpy in
//! float64, following models/MODEL_CARD.md literally, plus the plan-construction rules and
//! every refusal.

use diffshield::{DdimPlan, Error, PlanSpec, Schedule};

/// Relative tolerance of every coefficient comparison.
const REL: f64 = 1e-12;

/// Asserts |got - want| <= REL * max(|got|, |want|) and returns the relative error.
fn assert_close(got: f64, want: f64, what: &str) -> f64 {
    let scale = got.abs().max(want.abs());
    let rel = if scale == 0.0 { 0.0 } else { (got - want).abs() / scale };
    assert!(rel <= REL, "{what}: got {got:e}, want {want:e} (rel err {rel:e})");
    rel
}

// Produced by:
// python3 -c "import numpy as np; b=np.linspace(1e-4,0.02,1000); \
//   ab=np.concatenate([[1.0],np.cumprod(1-b)]); print([repr(float(ab[t])) for t in (140,500,1000)])"
const ABAR_140: f64 = 0.8121902060395861;
const ABAR_500: f64 = 0.07858724288177824;
const ABAR_1000: f64 = 4.035829765375676e-05;

#[test]
fn ddpm_linear_1000_matches_numpy() {
    let sch = Schedule::ddpm_linear_1000();
    assert_eq!(sch.len(), 1000);
    assert_eq!(sch.abar(0), 1.0);
    let errs = [
        assert_close(sch.abar(140), ABAR_140, "abar(140)"),
        assert_close(sch.abar(500), ABAR_500, "abar(500)"),
        assert_close(sch.abar(1000), ABAR_1000, "abar(1000)"),
    ];
    eprintln!("abar(140, 500, 1000) relative errors vs numpy: {errs:?}");
    // abar(1) = 1 - beta_1 = 1 - 1e-4 (beta is indexed from s = 1, not from 0).
    assert_close(sch.abar(1), 1.0 - 1e-4, "abar(1)");
    for t in 1..=1000 {
        assert!(sch.abar(t) < sch.abar(t - 1), "abar must strictly decrease at t={t}");
    }
}

/// (t, s, sqrt_abar_t, sqrt_one_minus_abar_t, sqrt_abar_s, dir_coeff, sigma) of every step of
/// T*=140, stride 10, eta 1. Produced by:
/// python3 -c "import numpy as np; b=np.linspace(1e-4,0.02,1000); \
///   ab=np.concatenate([[1.0],np.cumprod(1-b)]); T=list(range(140,-1,-10)); \
///   sg=lambda t,s: np.sqrt((1-ab[s])/(1-ab[t]))*np.sqrt(1-ab[t]/ab[s]); \
///   [print((t,s,repr(float(np.sqrt(ab[t]))),repr(float(np.sqrt(1-ab[t]))),repr(float(np.sqrt(ab[s]))), \
///   repr(float(np.sqrt(max(0,1-ab[s]-sg(t,s)**2)))),repr(float(sg(t,s))))) for t,s in zip(T[:-1],T[1:])]"
#[rustfmt::skip]
const STEPS_140_10_ETA1: [(u32, u32, f64, f64, f64, f64, f64); 14] = [
    (140, 130, 0.9012159597119805, 0.4333702735080175, 0.9138444932647755, 0.37522100714198664, 0.1552334948682115),
    (130, 120, 0.9138444932647755, 0.4060643325012009, 0.9257250300526096, 0.3477220318715835, 0.1487365364837855),
    (120, 110, 0.9257250300526096, 0.3781972616692181, 0.9368241606430137, 0.3197030345546336, 0.14195232203832267),
    (110, 100, 0.9368241606430137, 0.34980064613364126, 0.9471104189454153, 0.29120415589904886, 0.1348406241166307),
    (100, 90, 0.9471104189454153, 0.3209078595563531, 0.9565544308587507, 0.2622696265972137, 0.1273509472640453),
    (90, 80, 0.9565544308587507, 0.2915538043046112, 0.965129054073225, 0.232948753263509, 0.11941853849674512),
    (80, 70, 0.965129054073225, 0.26177453845575166, 0.9728095080947153, 0.2032976682198131, 0.11095818607432632),
    (70, 60, 0.9728095080947153, 0.23160669455030447, 0.9795734936197024, 0.1733825545006261, 0.10185411328232309),
    (60, 50, 0.9795734936197024, 0.20108647542212002, 0.9854013004555252, 0.1432859159889071, 0.09194250018234054),
    (50, 40, 0.9854013004555252, 0.1702476932606132, 0.9902759032546457, 0.11311969863900655, 0.08097881953335781),
    (40, 30, 0.9902759032546457, 0.13911734411350654, 0.9941830444118809, 0.0830556819856934, 0.06856987599387603),
    (30, 20, 0.9941830444118809, 0.107703640625209, 0.9971113035595163, 0.053406793596331645, 0.05400706168271889),
    (20, 10, 0.9971113035595163, 0.07595425145337273, 0.999052153186126, 0.024898069250500823, 0.03570548083646045),
    (10, 0, 0.999052153186126, 0.043529245504207614, 1.0, 0.0, 0.0),
];

/// sqrt(1 - abar(s)) for s = 130, 120, ..., 0: the eta = 0 dir_coeff. Produced by:
/// python3 -c "import numpy as np; b=np.linspace(1e-4,0.02,1000); \
///   ab=np.concatenate([[1.0],np.cumprod(1-b)]); print([float(np.sqrt(1-ab[s])) for s in range(130,-1,-10)])"
#[rustfmt::skip]
const SQRT_1M_ABAR_S_140_10: [f64; 14] = [
    0.4060643325012009, 0.3781972616692181, 0.34980064613364126, 0.3209078595563531,
    0.2915538043046112, 0.26177453845575166, 0.23160669455030447, 0.20108647542212002,
    0.1702476932606132, 0.13911734411350654, 0.107703640625209, 0.07595425145337273,
    0.043529245504207614, 0.0,
];

fn plan(t_star: u32, spec: PlanSpec, eta: f64) -> diffshield::Result<DdimPlan> {
    DdimPlan::new(&Schedule::ddpm_linear_1000(), 1..=500, t_star, &spec, eta)
}

#[test]
fn plan_140_stride_10_eta_1_matches_numpy() {
    let p = plan(140, PlanSpec::Stride(10), 1.0).unwrap();
    assert_eq!(p.t_star(), 140);
    assert_eq!(p.eta(), 1.0);
    let want_t: Vec<u32> = (0..=14).map(|k| 140 - 10 * k).collect();
    assert_eq!(p.timesteps(), want_t.as_slice());
    let (a, b) = p.start_coeffs();
    assert_close(a, ABAR_140.sqrt(), "start sqrt(abar(T*))");
    assert_close(b, (1.0 - ABAR_140).sqrt(), "start sqrt(1-abar(T*))");
    assert_eq!(p.steps().len(), STEPS_140_10_ETA1.len());
    let mut worst = 0.0f64;
    for (c, &(t, s, sa_t, s1m_t, sa_s, dir, sigma)) in p.steps().iter().zip(&STEPS_140_10_ETA1) {
        assert_eq!((c.t, c.s), (t, s));
        worst = worst.max(assert_close(c.sqrt_abar_t, sa_t, &format!("sqrt_abar_t at t={t}")));
        worst = worst.max(assert_close(
            c.sqrt_one_minus_abar_t,
            s1m_t,
            &format!("sqrt_one_minus_abar_t at t={t}"),
        ));
        worst = worst.max(assert_close(c.sqrt_abar_s, sa_s, &format!("sqrt_abar_s at t={t}")));
        worst = worst.max(assert_close(c.dir_coeff, dir, &format!("dir_coeff at t={t}")));
        worst = worst.max(assert_close(c.sigma, sigma, &format!("sigma at t={t}")));
        // The x_s variance budget adds up: dir^2 + sigma^2 = 1 - abar(s).
        assert_close(
            c.dir_coeff.powi(2) + c.sigma.powi(2) + c.sqrt_abar_s.powi(2),
            1.0,
            &format!("variance budget at t={t}"),
        );
    }
    eprintln!("T*=140 stride 10 eta 1: worst relative coefficient error vs numpy {worst:.1e}");
    // The last step lands on s = 0 (abar = 1): no noise there, whatever eta.
    let last = p.steps().last().unwrap();
    assert_eq!((last.sigma, last.dir_coeff, last.sqrt_abar_s), (0.0, 0.0, 1.0));
}

#[test]
fn plan_eta_0_is_deterministic_ddim() {
    let p = plan(140, PlanSpec::Stride(10), 0.0).unwrap();
    let p1 = plan(140, PlanSpec::Stride(10), 1.0).unwrap();
    assert_eq!(p.timesteps(), p1.timesteps());
    for ((c, c1), &want_dir) in p.steps().iter().zip(p1.steps()).zip(&SQRT_1M_ABAR_S_140_10) {
        assert_eq!(c.sigma, 0.0, "eta 0 must give sigma 0 at t={}", c.t);
        assert_close(c.dir_coeff, want_dir, &format!("eta-0 dir_coeff at t={}", c.t));
        // eta only changes sigma and dir_coeff.
        assert_eq!(
            (c.t, c.s, c.sqrt_abar_t, c.sqrt_one_minus_abar_t, c.sqrt_abar_s),
            (c1.t, c1.s, c1.sqrt_abar_t, c1.sqrt_one_minus_abar_t, c1.sqrt_abar_s)
        );
    }
    // eta scales sigma linearly.
    let half = plan(140, PlanSpec::Stride(10), 0.5).unwrap();
    for (c, &(t, .., sigma)) in half.steps().iter().zip(&STEPS_140_10_ETA1) {
        assert_close(c.sigma, 0.5 * sigma, &format!("eta-0.5 sigma at t={t}"));
    }
}

#[test]
fn stride_that_does_not_divide_appends_zero() {
    let p = plan(20, PlanSpec::Stride(7), 1.0).unwrap();
    assert_eq!(p.timesteps(), &[20, 13, 6, 0]);
    assert_eq!(p.steps().len(), 3);
    let pairs: Vec<(u32, u32)> = p.steps().iter().map(|c| (c.t, c.s)).collect();
    assert_eq!(pairs, vec![(20, 13), (13, 6), (6, 0)]);
    // Stride 1 visits every timestep; a stride of T* is a single step.
    let p = plan(5, PlanSpec::Stride(1), 1.0).unwrap();
    assert_eq!(p.timesteps(), &[5, 4, 3, 2, 1, 0]);
    let p = plan(30, PlanSpec::Stride(30), 1.0).unwrap();
    assert_eq!(p.timesteps(), &[30, 0]);
    // A stride beyond T* is still one step to 0.
    let p = plan(30, PlanSpec::Stride(50), 1.0).unwrap();
    assert_eq!(p.timesteps(), &[30, 0]);
}

#[test]
fn steps_spec() {
    // 14 steps on 140 is exactly stride 10, coefficients included.
    assert_eq!(
        plan(140, PlanSpec::Steps(14), 1.0).unwrap(),
        plan(140, PlanSpec::Stride(10), 1.0).unwrap()
    );
    let p = plan(10, PlanSpec::Steps(3), 1.0).unwrap();
    let ts = p.timesteps();
    assert_eq!(ts.len(), 4, "{ts:?}");
    assert_eq!(ts[0], 10);
    assert_eq!(*ts.last().unwrap(), 0);
    assert!(ts.windows(2).all(|w| w[0] > w[1]), "{ts:?}");
    // As even as integers allow: gaps differ by at most 1.
    let gaps: Vec<u32> = ts.windows(2).map(|w| w[0] - w[1]).collect();
    assert!(gaps.iter().max().unwrap() - gaps.iter().min().unwrap() <= 1, "{gaps:?}");
    // One step per timestep is the finest allowed.
    assert_eq!(plan(7, PlanSpec::Steps(7), 1.0).unwrap().timesteps(), &[7, 6, 5, 4, 3, 2, 1, 0]);
    assert_eq!(plan(7, PlanSpec::Steps(1), 1.0).unwrap().timesteps(), &[7, 0]);
}

#[test]
fn explicit_timesteps_get_zero_appended() {
    let p = plan(140, PlanSpec::Timesteps(vec![140, 100, 50]), 1.0).unwrap();
    assert_eq!(p.timesteps(), &[140, 100, 50, 0]);
    assert_eq!(p.steps().len(), 3);
    // A list already ending in 0 is kept as is.
    let p = plan(140, PlanSpec::Timesteps(vec![140, 100, 0]), 1.0).unwrap();
    assert_eq!(p.timesteps(), &[140, 100, 0]);
    // Its coefficients are those of the same (t, s) pairs in the stride plan.
    let p = plan(140, PlanSpec::Timesteps(vec![140, 130, 120]), 1.0).unwrap();
    for (c, &(t, s, .., sigma)) in p.steps().iter().zip(&STEPS_140_10_ETA1[..2]) {
        assert_eq!((c.t, c.s), (t, s));
        assert_close(c.sigma, sigma, "explicit-list sigma");
    }
}

#[test]
fn t_star_outside_trained_range_is_refused() {
    for t_star in [0, 501] {
        match plan(t_star, PlanSpec::Stride(10), 1.0) {
            Err(Error::TStarOutOfRange { t_star: got, min, max }) => {
                assert_eq!((got, min, max), (t_star, 1, 500));
            }
            other => panic!("T*={t_star}: expected TStarOutOfRange, got {other:?}"),
        }
    }
    // Both ends of the trained range are accepted.
    assert!(plan(1, PlanSpec::Stride(10), 1.0).is_ok());
    assert!(plan(500, PlanSpec::Stride(10), 1.0).is_ok());
    // A trained range wider than the schedule is capped at T = 1000.
    let sch = Schedule::ddpm_linear_1000();
    match DdimPlan::new(&sch, 1..=5000, 1001, &PlanSpec::Stride(10), 1.0) {
        Err(Error::TStarOutOfRange { max, .. }) => assert_eq!(max, 1000),
        other => panic!("T*=1001: expected TStarOutOfRange, got {other:?}"),
    }
}

#[test]
fn invalid_plans_are_refused() {
    let cases: Vec<(u32, PlanSpec)> = vec![
        (140, PlanSpec::Stride(0)),
        (140, PlanSpec::Steps(0)),
        (10, PlanSpec::Steps(11)),
        (140, PlanSpec::Timesteps(vec![140, 100, 100])),
        (140, PlanSpec::Timesteps(vec![140, 50, 100])),
        (140, PlanSpec::Timesteps(vec![130, 100, 50])),
        (140, PlanSpec::Timesteps(vec![100, 140])),
        (140, PlanSpec::Timesteps(vec![])),
    ];
    for (t_star, spec) in cases {
        match plan(t_star, spec.clone(), 1.0) {
            Err(Error::InvalidPlan(_)) => {}
            other => panic!("T*={t_star} {spec:?}: expected InvalidPlan, got {other:?}"),
        }
    }
}

#[test]
fn eta_outside_unit_interval_is_refused() {
    for eta in [-0.1, 1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        match plan(140, PlanSpec::Stride(10), eta) {
            Err(Error::InvalidConfig(_)) => {}
            other => panic!("eta={eta}: expected InvalidConfig, got {other:?}"),
        }
    }
    for eta in [0.0, 0.25, 1.0] {
        assert!(plan(140, PlanSpec::Stride(10), eta).is_ok(), "eta={eta}");
    }
}

#[test]
fn invalid_schedules_are_refused() {
    for (steps, b0, b1) in
        [(1, 1e-4, 0.02), (1000, -1e-4, 0.02), (1000, 1e-4, 1.0), (1000, f64::NAN, 0.02)]
    {
        match Schedule::linear(steps, b0, b1) {
            Err(Error::InvalidConfig(_)) => {}
            other => panic!("linear({steps}, {b0}, {b1}): expected InvalidConfig, got {other:?}"),
        }
    }
    assert_eq!(Schedule::linear(1000, 1e-4, 0.02).unwrap(), Schedule::ddpm_linear_1000());
}
