//! `diffshield tune`: grid parsing and validation, the Pareto frontier, CSV and plots on
//! hand-made results, and the per-point cache (a tiny real sweep run twice, then extended).

mod common;

use common::svg::assert_svg;
use diffshield::attack::AttackKind;
use diffshield::attack::ThreatModel;
use diffshield::config::DefenseConfig;
use diffshield::tune::grid::{Grid, GridAxes, GridPoint, PlanChoice};
use diffshield::tune::{self, pareto, AttackSettings, MeasureSettings, Progress, TuneOutcome};
use std::path::{Path, PathBuf};
use std::process::Command;

fn axes(pairs: &[(&str, &str)]) -> diffshield::Result<GridAxes> {
    let mut a = GridAxes::default();
    for (k, v) in pairs {
        a.set(k, v)?;
    }
    Ok(a)
}

fn err_text(r: diffshield::Result<impl std::fmt::Debug>) -> String {
    r.expect_err("should have been refused").to_string()
}

#[test]
fn cli_lists_expand_into_the_product_of_the_axes() {
    let a = axes(&[
        ("t-star", "20, 60,100"),
        ("stride", "10,20"),
        ("steps", "4"),
        ("eta", "0,1"),
        ("votes", "1,3"),
        ("denoiser", "s,m"),
        ("threads", "1"),
    ])
    .unwrap();
    let pts = Grid::resolve(None, &a).unwrap().points().unwrap();
    assert_eq!(pts.len(), 3 * 3 * 2 * 2 * 2);
    assert_eq!(
        pts[0],
        GridPoint {
            denoiser: "s".into(),
            t_star: 20,
            plan: PlanChoice::Stride(10),
            eta: 0.0,
            votes: 1,
            threads: 1
        }
    );
    assert!(pts.iter().any(|p| p.plan == PlanChoice::Steps(4) && p.denoiser == "m"));
    // Axes not named take the default configuration's value, except votes and threads: 1
    // (the runtime's default is one thread per core).
    let pts = Grid::resolve(None, &axes(&[("t_star", "60")]).unwrap()).unwrap().points().unwrap();
    assert_eq!(pts.len(), 1);
    let c = pts[0].config(&DefenseConfig { threads: 2, ..DefenseConfig::default() });
    assert_eq!((c.t_star, c.stride, c.steps, c.eta, c.votes), (60, Some(10), None, 1.0, 1));
    assert_eq!((c.denoiser.as_str(), c.threads), ("s", 1));
}

#[test]
fn bad_grid_values_are_refused_naming_the_value() {
    let e = err_text(axes(&[("t_star", "20,600")]));
    assert!(e.contains("600") && e.contains("t_star"), "{e}");
    let e = err_text(axes(&[("t_star", "0")]));
    assert!(e.contains("t_star 0"), "{e}");
    let e = err_text(axes(&[("stride", "10,0")]));
    assert!(e.contains("stride 0"), "{e}");
    let e = err_text(axes(&[("steps", "0")]));
    assert!(e.contains("steps 0"), "{e}");
    let e = err_text(axes(&[("votes", "")]));
    assert!(e.contains("empty list") && e.contains("votes"), "{e}");
    let e = err_text(axes(&[("eta", "0,1.5")]));
    assert!(e.contains("1.5"), "{e}");
    let e = err_text(axes(&[("eta", "zero")]));
    assert!(e.contains("\"zero\""), "{e}");
    let e = err_text(axes(&[("threads", "0")]));
    assert!(e.contains("threads 0"), "{e}");
    let e = err_text(axes(&[("depth", "1")]));
    assert!(e.contains("unknown axis"), "{e}");
    // Steps that cannot fit below T* are refused when the grid is expanded.
    let a = axes(&[("t_star", "3"), ("steps", "5")]).unwrap();
    let e = err_text(Grid::resolve(None, &a).unwrap().points());
    assert!(e.contains("steps 5") && e.contains("t_star 3"), "{e}");
    // All of these are the user's errors (exit code 2), not internal faults.
    assert!(axes(&[("stride", "0")]).unwrap_err().is_user_error());
}

#[test]
fn toml_grid_files_join_their_grids_and_take_cli_overrides() {
    let text = r#"
[[grid]]
t_star = [20, 60]
steps = [4]
[[grid]]
t_star = [60]
steps = [4]
votes = [1, 3]
"#;
    let g = Grid::from_toml_str(text, Path::new("g.toml")).unwrap();
    let pts = g.points().unwrap();
    // (60, 4 steps, 1 vote) is in both grids and measured once.
    assert_eq!(pts.len(), 3);
    assert_eq!(pts.iter().filter(|p| p.t_star == 60 && p.votes == 1).count(), 1);
    // A single table is one grid.
    let one = Grid::from_toml_str("t_star = [100]\neta = [0.0]\n", Path::new("g.toml")).unwrap();
    assert_eq!(one.points().unwrap().len(), 1);
    // Command-line axes replace the same axis in every grid; a plan axis replaces both kinds.
    let cli = axes(&[("denoiser", "m"), ("stride", "20")]).unwrap();
    let pts = Grid::resolve(Some(g), &cli).unwrap().points().unwrap();
    assert!(pts.iter().all(|p| p.denoiser == "m" && p.plan == PlanChoice::Stride(20)));
    // Bad files: an empty list, an unknown key, a bad value; errors name the problem.
    let e = err_text(Grid::from_toml_str("t_star = []\n", Path::new("g.toml")));
    assert!(e.contains("t_star is an empty list"), "{e}");
    let e = err_text(Grid::from_toml_str("t_star = [60]\nstrde = [10]\n", Path::new("g.toml")));
    assert!(e.contains("strde") && e.contains("g.toml"), "{e}");
    let e = err_text(Grid::from_toml_str("[[grid]]\nt_star = [501]\n", Path::new("g.toml")));
    assert!(e.contains("501"), "{e}");
    // The built-in grid is valid and plans against the shipped models.
    let pts = Grid::default_grid().points().unwrap();
    assert!(pts.len() >= 20, "{}", pts.len());
    let base = DefenseConfig { models: Some(common::models_dir()), ..Default::default() };
    let manifest = diffshield::manifest::Manifest::load(&common::models_dir()).unwrap();
    tune::check_points(&pts, &base, &manifest).unwrap();
}

#[test]
fn pareto_frontier_of_hand_made_points() {
    // (latency ms, accuracy)
    let pts = [
        (10.0, 0.50),    // 0: fastest -> frontier
        (20.0, 0.40),    // 1: slower and worse than 0 -> dominated
        (20.0, 0.70),    // 2: frontier
        (30.0, 0.70),    // 3: as accurate as 2 but slower -> dominated
        (40.0, 0.90),    // 4: frontier
        (40.0, 0.90),    // 5: exact tie with 4 -> both on the frontier
        (10.0, 0.45),    // 6: as fast as 0 but worse -> dominated
        (f64::NAN, 1.0), // 7: unmeasured -> never on it, dominates nothing
    ];
    let on = pareto::frontier(&pts);
    assert_eq!(on, vec![true, false, true, false, true, true, false, false]);
    assert_eq!(pareto::frontier_order(&pts), vec![0, 2, 4, 5]);
    assert!(pareto::frontier(&[]).is_empty());
    assert_eq!(pareto::frontier(&[(5.0, 0.0)]), vec![true]);
}

/// A CIFAR-10 binary file of `n` synthetic images (smooth colour ramps) with labels 0..n.
fn synthetic_cifar(dir: &Path, n: usize) -> PathBuf {
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.push((i % 10) as u8);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    bytes.push(((x * 7 + y * 3 + c * 50 + i * 31) % 256) as u8);
                }
            }
        }
    }
    let p = dir.join("tiny.bin");
    std::fs::write(&p, bytes).unwrap();
    p
}

fn settings(data: &Path, images: usize, kind: Option<AttackKind>) -> MeasureSettings {
    let base = DefenseConfig { models: Some(common::models_dir()), ..Default::default() };
    MeasureSettings {
        data: data.to_path_buf(),
        clean_images: images,
        warmup: 1,
        attack: AttackSettings {
            kind,
            threat: "linf:8/255".parse::<ThreatModel>().unwrap(),
            queries: 2,
            pgd_steps: 1,
            eot: 1,
            images,
            runs: 1,
        },
        base,
        clock: tune::LatencyClock::Auto,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffshield-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a sweep and returns the outcome and the labels it measured (not cached).
fn sweep(grid: &Grid, s: &MeasureSettings, out: &Path) -> (TuneOutcome, Vec<String>) {
    let mut measured = Vec::new();
    let o = tune::run(grid, s, out, false, &mut |p| {
        if let Progress::Done { result, .. } = p {
            measured.push(result.label.clone())
        }
    })
    .unwrap();
    (o, measured)
}

#[test]
fn cache_skips_finished_points_and_extends_with_new_ones() {
    let dir = temp_dir("cache");
    let data = synthetic_cifar(&dir, 2);
    let out = dir.join("out");
    let s = settings(&data, 2, Some(AttackKind::Square));
    let small = axes(&[("t_star", "10"), ("steps", "1")]).unwrap();
    let grid = Grid::resolve(None, &small).unwrap();

    let (first, measured) = sweep(&grid, &s, &out);
    assert_eq!(measured, vec!["s T*10 1steps eta1 v1 t1".to_string()]);
    assert_eq!((first.measured, first.cached), (1, 0));
    let r = &first.results[0];
    assert_eq!(r.timesteps, vec![10, 0]);
    assert_eq!(r.latency.frames, 2);
    assert!(r.latency.p50_ms > 0.0 && r.latency.p99_ms >= r.latency.p50_ms);
    if let Some(cpu) = r.latency.cpu_p50_ms {
        // CPU time of the deciding thread cannot exceed the wall time by more than rounding.
        assert!(cpu > 0.0 && cpu <= r.latency.p99_ms * 1.01, "{cpu} vs {:?}", r.latency);
    }
    let robust = r.robust.as_ref().expect("square was run");
    assert_eq!((robust.images, robust.runs), (2, 1));
    let clean_attacked = robust.clean_acc.expect("clean accuracy on the attacked images");
    assert_eq!(clean_attacked, r.clean_acc, "the same two images");
    let files = first.files.as_ref().unwrap();
    for f in [&files.csv, &files.markdown, &files.pareto_svg, &files.depth_svg, &files.summary] {
        assert!(f.is_file(), "{} was not written", f.display());
    }
    assert_svg(&std::fs::read_to_string(&files.pareto_svg).unwrap(), &["Pareto frontier"]);
    assert_svg(&std::fs::read_to_string(&files.depth_svg).unwrap(), &[]);
    let csv = std::fs::read_to_string(&files.csv).unwrap();
    assert_eq!(csv.lines().count(), 2);
    let cache_files = std::fs::read_dir(out.join("points")).unwrap().count();
    assert_eq!(cache_files, 1);

    // The same sweep again measures nothing and reports the same numbers.
    let (again, measured) = sweep(&grid, &s, &out);
    assert!(measured.is_empty(), "re-measured {measured:?}");
    assert_eq!((again.measured, again.cached), (0, 1));
    assert_eq!(again.results[0].latency, first.results[0].latency);
    assert!(std::fs::read_to_string(&files.csv).unwrap().contains(",true,"));

    // Extending the grid measures only the new point.
    let wider = axes(&[("t_star", "10,20"), ("steps", "1")]).unwrap();
    let (ext, measured) = sweep(&Grid::resolve(None, &wider).unwrap(), &s, &out);
    assert_eq!(measured, vec!["s T*20 1steps eta1 v1 t1".to_string()]);
    assert_eq!((ext.measured, ext.cached, ext.results.len()), (1, 1, 2));
    assert_eq!(std::fs::read_dir(out.join("points")).unwrap().count(), 2);

    // A dry run measures nothing; other measurement settings are other cache keys.
    let mut other = s.clone();
    other.attack.queries = 3;
    let dry = tune::run(&grid, &other, &out, true, &mut |_| {}).unwrap();
    assert_eq!((dry.measured, dry.cached), (0, 0));
    assert_eq!(dry.pending, vec!["s T*10 1steps eta1 v1 t1".to_string()]);
    let point = &grid.points().unwrap()[0];
    assert_ne!(tune::cache_key(point, &s, ""), tune::cache_key(point, &other, ""));

    // The files' contents are part of the key: the data rewritten in place at the same size,
    // or a model file replaced (here the denoiser by the classifier's bytes), is measured
    // again; restored, the cached point is found again.
    let pending = |s: &MeasureSettings| {
        let dry = tune::run(&grid, s, &out, true, &mut |_| {}).unwrap();
        (dry.cached, dry.pending.len())
    };
    assert_eq!(pending(&s), (1, 0));
    let original = std::fs::read(&data).unwrap();
    let mut changed = original.clone();
    changed[1] ^= 1;
    std::fs::write(&data, &changed).unwrap();
    assert_eq!(pending(&s), (0, 1), "a rewritten data file read from the cache");
    std::fs::write(&data, &original).unwrap();
    assert_eq!(pending(&s), (1, 0));
    let models = common::models_copy(&dir, "models", |m| m);
    let mut copied = s.clone();
    copied.base.models = Some(models.clone());
    assert_eq!(pending(&copied), (1, 0), "the same files in another folder are the same key");
    let denoiser = models.join("denoiser_s.onnx");
    std::fs::remove_file(&denoiser).unwrap();
    std::fs::copy(common::models_dir().join("classifier.onnx"), &denoiser).unwrap();
    assert_eq!(pending(&copied), (0, 1), "a replaced denoiser read from the cache");
    // So is the kernel level the latencies were measured at.
    use diffshield::backend::KernelLevel;
    let points = grid.points().unwrap();
    let manifest = diffshield::manifest::Manifest::load(&common::models_dir()).unwrap();
    let at = |level| tune::input_fingerprints(&points, &s, &manifest, level).unwrap();
    assert_ne!(at(KernelLevel::Portable), at(KernelLevel::Tract));
    assert_eq!(at(KernelLevel::Portable), at(KernelLevel::Portable));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unavailable_attack_and_bad_values_exit_with_code_2() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_diffshield"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("tune")
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let dir = temp_dir("cli");
    let data = synthetic_cifar(&dir, 2);
    let data = data.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let (code, err) = run(&["--data", data, "--out", out, "--t-star", "20,600"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("600"), "{err}");
    let (code, err) = run(&["--data", data, "--out", out, "--stride", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("stride 0"), "{err}");
    let (code, err) = run(&["--data", data, "--out", out, "--t-star", "20", "--attack", "fgsm"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown attack \"fgsm\""), "{err}");
    let (code, err) = run(&["--data", data, "--out", out, "--denoiser", "xl", "--t-star", "20"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("xl"), "{err}");
    let (code, err) = run(&["--print-grid", "--data", data]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!Path::new(out).join("points").exists(), "nothing may be measured");
    let _ = std::fs::remove_dir_all(&dir);
}
