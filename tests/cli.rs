//! The command line on good and bad input: JSON on stdout, a named error and exit code 2 on
//! anything the user got wrong, never a panic.

mod common;

use common::{models_dir, scratch, synthetic_cifar};
use std::path::Path;
use std::process::{Command, Output};

fn diffshield<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffshield"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("binary runs")
}

/// Asserts a user error: exit code 2, the message names `needle`, no panic, nothing on stdout.
fn assert_user_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "partial output: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn classify_samples_prints_one_json_line_per_image() {
    let out = diffshield(&["classify", "samples", "--limit", "3", "--seed", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let probs: Vec<f64> =
            l["probs"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(probs.len(), 10);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        assert_eq!(l["steps"], 14);
        assert!(l["class"].is_string() && l["source"].as_str().unwrap().ends_with(".png"));
    }
    // Same seed, same decisions, bit for bit.
    let again = diffshield(&["classify", "samples", "--limit", "3", "--seed", "7"]);
    let strip = |t: &str| -> Vec<serde_json::Value> {
        t.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["purify_ms"] = 0.into();
                v["classify_ms"] = 0.into();
                v
            })
            .collect()
    };
    assert_eq!(strip(&text), strip(&String::from_utf8(again.stdout).unwrap()));
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn eval_no_purify_reports_clean_accuracy_json() {
    let data = common::shared_data("cifar10_test_2000.bin");
    let out =
        diffshield(&["eval", "--data", data.to_str().unwrap(), "--limit", "200", "--no-purify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["images"], 200);
    assert!(v["clean_acc"].as_f64().unwrap() > 0.85);
    assert!(v["purified_acc"].is_null());
    assert_eq!(v["config"]["t_star"], 140);
}

#[test]
fn t_star_outside_trained_range_is_refused() {
    for t in ["0", "501"] {
        let out = diffshield(&["classify", "samples", "--t-star", t]);
        assert_user_error(&out, &format!("T*={t} is outside the denoiser's trained range 1..=500"));
    }
}

#[test]
fn bad_plans_and_options_are_refused() {
    assert_user_error(
        &diffshield(&["classify", "samples", "--stride", "0"]),
        "stride must be at least 1",
    );
    assert_user_error(&diffshield(&["classify", "samples", "--eta", "2"]), "eta must be in [0, 1]");
    assert_user_error(
        &diffshield(&["classify", "samples", "--votes", "0"]),
        "votes must be at least 1",
    );
    assert_user_error(
        &diffshield(&["classify", "samples", "--timesteps", "140,150"]),
        "timesteps must strictly decrease",
    );
    assert_user_error(
        &diffshield(&["classify", "samples", "--denoiser", "xl"]),
        "unknown denoiser \"xl\"",
    );
    assert_user_error(
        &diffshield(&["classify", "samples", "--backend", "cuda"]),
        "no CUDA backend",
    );
}

#[test]
fn config_file_is_read_and_typos_are_refused() {
    let d = scratch("config");
    let good = d.join("good.toml");
    std::fs::write(&good, "t_star = 60\nstride = 20\nseed = 3\nvotes = 2\n").unwrap();
    let out = diffshield(&["classify", "samples/02_cat.png", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"], 3); // 60, 40, 20, 0
    assert_eq!(v["vote_labels"].as_array().unwrap().len(), 2);
    let typo = d.join("typo.toml");
    std::fs::write(&typo, "tstar = 60\n").unwrap();
    assert_user_error(
        &diffshield(&["classify", "samples", "--config", typo.to_str().unwrap()]),
        "unknown field `tstar`",
    );
}

#[test]
fn corrupt_truncated_and_missing_images_are_named() {
    let d = scratch("images");
    let garbage = d.join("garbage.png");
    std::fs::write(&garbage, b"this is not a png at all").unwrap();
    assert_user_error(&diffshield(&["classify", garbage.to_str().unwrap()]), "garbage.png");
    let good =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/02_cat.png")).unwrap();
    let truncated = d.join("truncated.png");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    assert_user_error(&diffshield(&["classify", truncated.to_str().unwrap()]), "truncated.png");
    assert_user_error(&diffshield(&["classify", d.join("nope.png").to_str().unwrap()]), "nope.png");
    // A bad file among good ones: nothing is printed for the good ones either.
    assert_user_error(
        &diffshield(&["classify", "samples/02_cat.png", garbage.to_str().unwrap()]),
        "garbage.png",
    );
}

#[test]
fn wrong_size_cifar_bin_is_named() {
    let d = scratch("cifar");
    let bin = d.join("short.bin");
    std::fs::write(&bin, vec![0u8; 3073 + 100]).unwrap();
    assert_user_error(&diffshield(&["classify", bin.to_str().unwrap()]), "3073");
    assert_user_error(&diffshield(&["eval", "--data", bin.to_str().unwrap()]), "short.bin");
}

/// A models folder with the real manifest, `edit` applied to it, and links to the real models.
fn models_copy(name: &str, edit: impl Fn(String) -> String) -> common::Scratch {
    let d = scratch(name);
    let (parent, leaf) = (d.parent().unwrap(), d.file_name().unwrap().to_str().unwrap());
    common::models_copy(parent, leaf, edit);
    d
}

#[test]
fn model_problems_are_named() {
    let missing = models_copy("missing", |m| m.replace("\"denoiser_s.onnx\"", "\"gone.onnx\""));
    assert_user_error(
        &diffshield(&["classify", "samples/02_cat.png", "--models", missing.to_str().unwrap()]),
        "gone.onnx: file not found",
    );
    let renamed =
        models_copy("mismatch", |m| m.replacen("input = \"x_t\"", "input = \"noisy\"", 1));
    assert_user_error(
        &diffshield(&[
            "classify",
            "samples/02_cat.png",
            "--denoiser",
            "m",
            "--models",
            renamed.to_str().unwrap(),
        ]),
        "does not match its manifest entry",
    );
    let shape = models_copy("shape", |m| {
        m.replacen("input_shape = [3, 32, 32]", "input_shape = [3, 64, 64]", 1)
    });
    assert_user_error(
        &diffshield(&["classify", "samples/02_cat.png", "--models", shape.to_str().unwrap()]),
        "does not match its manifest entry",
    );
    let truncated = scratch("truncated");
    std::fs::copy(models_dir().join("models.toml"), truncated.join("models.toml")).unwrap();
    let bytes = std::fs::read(models_dir().join("denoiser_s.onnx")).unwrap();
    std::fs::write(truncated.join("denoiser_s.onnx"), &bytes[..bytes.len() / 3]).unwrap();
    std::os::unix::fs::symlink(
        models_dir().join("classifier.onnx"),
        truncated.join("classifier.onnx"),
    )
    .unwrap();
    assert_user_error(
        &diffshield(&["classify", "samples/02_cat.png", "--models", truncated.to_str().unwrap()]),
        "cannot load model",
    );
    let no_manifest = scratch("empty");
    assert_user_error(
        &diffshield(&["classify", "samples/02_cat.png", "--models", no_manifest.to_str().unwrap()]),
        "models.toml",
    );
}

fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffshield"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn run_streams_a_folder_in_name_order_and_ends_with_a_summary() {
    let out = diffshield(&["run", "--folder", "samples", "--limit", "3", "--stride", "70"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 4, "3 frames and a summary");
    for (i, l) in lines[..3].iter().enumerate() {
        assert_eq!(l["frame"], i as u64);
        assert!(l["source"].as_str().unwrap().contains(&format!("{i:02}_")));
        assert_eq!(l["steps"], 2);
    }
    let summary = &lines[3];
    assert_eq!(summary["frames"], 3);
    assert_eq!(summary["dropped"], 0);
    for k in ["deadline_missed", "p50_ms", "p95_ms", "p99_ms"] {
        assert!(summary.get(k).is_some(), "summary lacks {k}");
    }
}

#[test]
fn run_reads_raw_rgb_frames_from_stdin() {
    let frame: Vec<u8> = (0..40 * 30 * 3).map(|i| (i % 251) as u8).collect();
    let two = [frame.clone(), frame].concat();
    let out = run_with_stdin(&["run", "--raw", "40x30", "--stride", "70"], &two);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["source"], "stdin#1");
    // A truncated last frame is an error naming the sizes (after the whole frames were classified).
    let out = run_with_stdin(&["run", "--raw", "40x30", "--stride", "70"], &two[..two.len() - 10]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3600"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = run_with_stdin(&["run", "--raw", "40by30"], &[]);
    assert_user_error(&out, "WIDTHxHEIGHT");
}

#[test]
fn run_refuses_a_budget_that_cannot_fit_one_step() {
    let out = diffshield(&["run", "--folder", "samples", "--limit", "1", "--budget-ms", "0.001"]);
    assert_user_error(&out, "cannot fit even 1 DDIM step");
    // The budget as given, not rounded to "0.0 ms".
    assert_user_error(&out, "a budget of 0.001 ms");
    assert_user_error(&diffshield(&["run", "--folder", "samples", "--budget-ms=-3"]), "budget_ms");
}

#[test]
fn run_under_a_generous_budget_meets_its_deadlines() {
    let out = diffshield(&["run", "--folder", "samples", "--limit", "2", "--budget-ms", "60000"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines[0]["planned_steps"], 14);
    assert_eq!(lines[0]["deadline_met"], true);
    assert_eq!(lines[2]["deadline_missed"], 0);
}

#[test]
fn classify_under_a_budget_reports_its_plan() {
    let out = diffshield(&[
        "classify",
        "samples",
        "--limit",
        "2",
        "--budget-ms",
        "60000",
        "--votes",
        "2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["planned_steps"], 14);
    assert_eq!(lines[1]["vote_labels"].as_array().unwrap().len(), 2);
    assert_eq!(lines[1]["deadline_met"], true);
    assert_eq!(lines[1]["anytime"], false);
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn attack_writes_a_report_with_the_robust_accuracy_keys() {
    let data = common::shared_data("cifar10_test_2000.bin");
    let d = scratch("attack");
    let report = d.join("report.json");
    let out = diffshield(&[
        "attack",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "4",
        "--threat",
        "linf:8/255",
        "--queries",
        "10",
        "--runs",
        "2",
        "--attack",
        "square",
        "--mode",
        "undefended",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "with --out and no --json nothing goes to stdout");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["images"], 4);
    let r = &v["results"][0];
    assert_eq!(r["threat"], "linf:8/255");
    for k in ["robust_acc", "robust_acc_worst", "robust_acc_majority"] {
        let a = r[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{k} = {a}");
    }
    assert!(r["robust_acc"].as_f64().unwrap() <= v["undefended_clean_acc"].as_f64().unwrap());
    assert_eq!(r["per_image"].as_array().unwrap().len(), 4);
    assert!(r["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["distance"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6));
    assert_user_error(
        &diffshield(&["attack", "--data", data.to_str().unwrap(), "--threat", "linf:eight"]),
        "expected NORM:EPS",
    );
}

#[cfg(feature = "twin")]
#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn pgd_attack_resumes_and_writes_table_and_junit() {
    let data = common::shared_data("cifar10_test_2000.bin");
    let d = scratch("pgd");
    let (report, md, junit) = (d.join("r.json"), d.join("t.md"), d.join("j.xml"));
    let args = |limit: &str| {
        vec![
            "attack".to_string(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--limit".into(),
            limit.into(),
            "--threat".into(),
            "linf:8/255,linf:0".into(),
            "--mode".into(),
            "undefended".into(),
            "--pgd-steps".into(),
            "10".into(),
            "--attack-batch".into(),
            "2".into(),
            "--runs".into(),
            "1".into(),
            "--out".into(),
            report.to_str().unwrap().into(),
            "--markdown".into(),
            md.to_str().unwrap().into(),
            "--junit".into(),
            junit.to_str().unwrap().into(),
            "--min-acc".into(),
            // A threshold the run passes: a failing one exits 1 (tests/hardening.rs).
            "undefended=0".into(),
        ]
    };
    let run = |a: Vec<String>| diffshield(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(args("4"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["complete"], true);
    let attacked = &v["results"][0];
    let untouched = &v["results"][1];
    assert!(attacked["robust_acc"].as_f64().unwrap() < v["undefended_clean_acc"].as_f64().unwrap());
    assert_eq!(untouched["robust_acc"], v["undefended_clean_acc"], "eps 0 is clean accuracy");
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("| undefended |"), "{table}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    let checks = v["sanity"].as_array().unwrap().len();
    assert!(checks >= 7, "{}", v["sanity"]);
    assert!(xml.contains(&format!("tests=\"{}\"", 2 + checks)), "{xml}");
    let status = |name: &str| {
        let c = v["sanity"].as_array().unwrap().iter().find(|c| c["check"] == name).unwrap();
        c["status"].as_str().unwrap().to_string()
    };
    assert_eq!(status("eps-0-is-clean"), "passed", "{}", v["sanity"]);
    assert_eq!(status("undefended-reaches-zero"), "passed", "{}", v["sanity"]);
    assert_eq!(status("unbounded-eps-reaches-zero"), "not-run");
    assert!(v["fingerprints"]["data"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(v["data"], "cifar10_test_2000.bin", "no machine path in the report");
    assert_eq!(v["tool"]["name"], "diffshield");
    // Resuming a finished run measures nothing new and keeps the results.
    let mut again = args("4");
    again.push("--resume".into());
    let out = run(again);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(w["results"], v["results"]);
    // Resuming with other attack settings is refused.
    let mut other = args("4");
    other[10] = "5".into();
    other.push("--resume".into());
    assert_user_error(&run(other), "--resume");
}

/// The binary run in `dir` with `env` set.
fn diffshield_in(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffshield"));
    cmd.args(args).current_dir(dir).env_remove("DIFFSHIELD_MODELS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

#[test]
fn runs_without_a_seed_differ_and_the_reported_seed_replays_them() {
    let sample = models_dir().join("../samples/02_cat.png");
    let sample = sample.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["classify", sample, "--votes", "2", "--t-star", "60", "--stride", "20"];
        args.extend_from_slice(extra);
        let out = diffshield(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["purify_ms"] = 0.into();
        v["classify_ms"] = 0.into();
        v
    };
    let (a, b) = (run(&[]), run(&[]));
    assert_ne!(a["seed"], b["seed"], "two runs drew the same seed");
    assert_ne!(a["probs"], b["probs"], "two runs drew the same noise");
    let seed = a["seed"].as_u64().unwrap().to_string();
    assert_eq!(run(&["--seed", &seed]), a, "the reported seed replays the decision");
    let batch = |n: &str| {
        let out = diffshield(&["classify", "samples", "--limit", "4", "--seed", "9", "--batch", n]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json_lines(&out)
    };
    for (x, y) in batch("1").iter().zip(&batch("4")) {
        assert_eq!((&x["frame"], &x["label"], &x["seed"]), (&y["frame"], &y["label"], &y["seed"]));
    }
}

#[test]
fn models_are_found_from_any_directory_and_a_missing_folder_names_the_option() {
    let elsewhere = scratch("cwd");
    let sample = models_dir().join("../samples/02_cat.png");
    let sample = sample.to_str().unwrap();
    let out = diffshield_in(&elsewhere, &[], &["classify", sample, "--stride", "70"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let models = models_dir();
    let out = diffshield_in(
        &elsewhere,
        &[("DIFFSHIELD_MODELS", models.to_str().unwrap())],
        &["classify", sample, "--stride", "70"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = diffshield_in(&elsewhere, &[("DIFFSHIELD_MODELS", "nowhere")], &["classify", sample]);
    assert_user_error(&out, "--models");
    // A relative models path in a config file is relative to the file.
    let conf = elsewhere.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::os::unix::fs::symlink(&models, elsewhere.join("my-models")).unwrap();
    std::fs::write(conf.join("d.toml"), "models = \"../my-models\"\nstride = 70\n").unwrap();
    let out = diffshield(&["classify", sample, "--config", conf.join("d.toml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn text_format_top_k_and_abstention() {
    let out = diffshield(&[
        "classify", "samples", "--limit", "2", "--stride", "70", "--format", "text", "--seed", "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().all(|l| l.contains("top: ") && l.contains("seed 1]")), "{text}");
    let out = diffshield(&[
        "classify",
        "samples",
        "--limit",
        "2",
        "--stride",
        "70",
        "--top-k",
        "5",
        "--abstain-below",
        "0.99",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for l in json_lines(&out) {
        assert_eq!(l["type"], "decision");
        assert_eq!(l["top_k"].as_array().unwrap().len(), 5);
        assert!(l["label"].is_null() && l["class"] == "unknown", "{l}");
        assert!(l["confidence"]["mean_prob"].as_f64().unwrap() < 0.99);
    }
    assert_user_error(
        &diffshield(&["classify", "samples", "--abstain-below", "2"]),
        "min_confidence",
    );
}

#[test]
fn a_closed_stdout_ends_quietly_and_a_full_one_is_an_error() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffshield"))
        .args(["classify", "samples", "--limit", "6", "--stride", "70"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before the first line
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    let full = std::fs::File::options().write(true).open("/dev/full").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_diffshield"))
        .args(["classify", "samples/02_cat.png", "--stride", "70"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stdout") && !err.contains("panicked"), "{err}");
}

#[test]
fn backend_auto_falls_back_to_the_cpu_and_cuda_names_its_reason() {
    let out =
        diffshield(&["classify", "samples/02_cat.png", "--backend", "auto", "--stride", "70"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_user_error(
        &diffshield(&[
            "classify",
            "samples/02_cat.png",
            "--backend",
            "cuda",
            "--precision",
            "int8",
        ]),
        "CUDA",
    );
}

/// The GPU check's code on the CPU: everything scripts/gpu_check.sh runs except the device.
#[test]
fn device_check_runs_every_check_on_the_cpu() {
    let d = scratch("devcheck");
    let data = synthetic_cifar(&d, "d.bin", 8, 0);
    let out = diffshield(&[
        "device-check",
        "--vectors",
        "tests/vectors",
        "--data",
        data.to_str().unwrap(),
        "--images",
        "8",
        "--batches",
        "1,8",
        "--speed-frames",
        "2",
        "--speed-batch",
        "8",
        "--t-star",
        "20",
        "--stride",
        "20",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    let checks: Vec<&str> = lines.iter().map(|l| l["check"].as_str().unwrap()).collect();
    assert_eq!(
        checks,
        ["engine", "placement", "placement", "golden", "accuracy", "batches", "speed", "summary"]
    );
    assert_eq!(lines[0]["engine"], "cpu");
    // What the speed figures belong to: this CPU, and the kernel level it ran.
    assert_eq!(lines[0]["cpu"], diffshield::backend::cpu_name());
    let level = diffshield::backend::KernelLevel::from_env().unwrap();
    assert_eq!(lines[0]["kernels"], level.name());
    assert_eq!(lines[0]["threads"], diffshield::config::default_threads());
    assert!(lines[3]["max_eps_rel"].as_f64().unwrap() < 1e-3, "{}", lines[3]);
    assert_eq!(lines[7]["passed"], true);
    // A check that fails fails the command.
    let out = diffshield(&[
        "device-check",
        "--vectors",
        "tests/vectors",
        "--speed-frames",
        "0",
        "--batches",
        "1",
        "--max-eps-rel",
        "1e-12",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    // A check that errors is reported with its error and the later checks still run (a GPU
    // lease is short: one run says everything it can).
    let out = diffshield(&device_check_without_vectors(&d));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    let checks: Vec<&str> = lines.iter().map(|l| l["check"].as_str().unwrap()).collect();
    assert_eq!(checks, ["engine", "placement", "placement", "golden", "batches", "summary"]);
    assert_eq!(lines[3]["passed"], false);
    let error = lines[3]["error"].as_str().unwrap();
    assert!(error.contains("no-vectors"), "{error}");
    // The OS's reason once (a library error's message already holds its source's text).
    assert_eq!(error.matches("os error").count(), 1, "{error}");
    assert_eq!(lines[4]["passed"], true);
    assert!(lines[5]["failed"][0].as_str().unwrap().starts_with("golden"), "{}", lines[5]);
}

/// A device check whose vectors folder (in `dir`) is missing: its golden check errors, the
/// others run on one short plan (T* 20, one step) at batch 1, and it exits 1.
fn device_check_without_vectors(dir: &Path) -> Vec<String> {
    let missing = dir.join("no-vectors");
    let args = ["--speed-frames", "0", "--batches", "1", "--t-star", "20", "--stride", "20"];
    ["device-check", "--vectors", missing.to_str().unwrap()]
        .into_iter()
        .chain(args)
        .map(String::from)
        .collect()
}

/// Without --threads the models run on one thread per core the process may use: the CPUs of
/// its affinity mask (here one, through taskset) and never more than the physical cores.
#[test]
fn threads_default_to_the_cores_this_process_may_use() {
    use std::io::Write;
    let d = scratch("threads");
    // The engine line comes first; the missing vectors end the check quickly (exit 1).
    let args = device_check_without_vectors(&d);
    let threads_of = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        json_lines(&out)[0]["threads"].clone()
    };
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = diffshield::config::default_threads();
    assert!((1..=usable).contains(&default), "{default} of {usable}");
    assert_eq!(threads_of(diffshield(&args)), default);
    let mut given = args.clone();
    given.extend(["--threads", "3"].map(String::from));
    assert_eq!(threads_of(diffshield(&given)), 3);
    // One CPU of those this process may use (the kernel's list, e.g. "0-1,4").
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let first_cpu = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .and_then(|list| list.trim().split([',', '-']).next().map(str::to_owned));
    let taskset = Command::new("taskset").arg("--version").output().is_ok();
    let Some(cpu) = first_cpu.filter(|_| taskset) else {
        // Not silently passed: the skip shows in the test output (stderr is not captured here).
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED threads_default_to_the_cores_this_process_may_use (affinity part): needs \
             taskset and /proc/self/status"
        );
        return;
    };
    let out = Command::new("taskset")
        .args(["-c", &cpu, env!("CARGO_BIN_EXE_diffshield")])
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("taskset runs the binary");
    assert_eq!(threads_of(out), 1);
}

/// AutoAttack's rand suite (APGD-CE + APGD-DLR, per image the worst) through the CLI.
#[cfg(feature = "twin")]
#[test]
fn aa_rand_runs_both_apgd_losses_and_keeps_the_worst() {
    let d = scratch("aarand");
    let data = synthetic_cifar(&d, "d.bin", 3, 0);
    let out = diffshield(&[
        "attack",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "3",
        "--attack",
        "aa-rand",
        "--mode",
        "undefended",
        "--pgd-steps",
        "5",
        "--eot",
        "1",
        "--runs",
        "1",
        "--threat",
        "linf:8/255",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["harness"]["attacks"][0]["kind"], "aa-rand");
    let r = &v["results"][0];
    let names: Vec<&str> =
        r["attacks"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["apgd-ce-5", "apgd-dlr-5"]);
    for p in r["per_image"].as_array().unwrap() {
        let by: Vec<u64> = p["by_attack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["runs_correct"].as_u64().unwrap())
            .collect();
        assert_eq!(p["runs_correct"].as_u64(), by.iter().copied().min(), "per image the worst");
    }
    assert!(r["robust_acc"].as_f64().unwrap() <= v["undefended_clean_acc"].as_f64().unwrap());
    assert!(r["max_distance"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6);
}

/// The strict protocol at a screening size: every attack of the preset, the known-noise
/// ablation evaluated with the attacker's noise, the unbounded probe and the sanity checks.
#[cfg(feature = "twin")]
#[test]
fn strict_protocol_runs_every_attack_and_reports_what_ran() {
    let d = scratch("strict");
    let data = synthetic_cifar(&d, "d.bin", 2, 3);
    let out = diffshield(&[
        "attack",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "2",
        "--protocol",
        "strict",
        "--pgd-steps",
        "2",
        "--eot",
        "1",
        "--runs",
        "3",
        "--t-star",
        "20",
        "--stride",
        "20",
        "--votes",
        "1",
        "--models",
        models_dir().to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protocol"], "strict");
    assert!(v["config"]["models"].is_null(), "no machine path: {}", v["config"]);
    assert_eq!(v["modes"], serde_json::json!(["white-box", "known-noise"]));
    assert_eq!(v["threats"], serde_json::json!(["linf:8/255"]));
    for cell in v["results"].as_array().unwrap() {
        assert_eq!(cell["threat_model"]["norm"], "linf");
        let names: Vec<&str> = cell["attacks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["apgd-ce-2", "apgd-dlr-2", "pgd-2", "pgd-1"], "{cell}");
        let pgd = &cell["attacks"][2];
        assert_eq!(pgd["step_size"], 0.007);
        assert_eq!(cell["attacks"][3]["step_size"].as_f64().unwrap(), 8.0 / 255.0, "FGSM: eps");
        assert!(pgd["forward_passes_per_image"].as_f64().unwrap() > 0.0);
        for p in cell["per_image"].as_array().unwrap() {
            assert!(p["clean_pred"].is_u64() || p["clean_pred"].is_null());
            if cell["mode"] == "known-noise" {
                for a in p["by_attack"].as_array().unwrap() {
                    let c = a["runs_correct"].as_u64().unwrap();
                    assert!(c == 0 || c == 3, "the known noise is the same in every run: {c}");
                }
            }
        }
    }
    let probe = &v["unbounded_probe"];
    assert_eq!((probe["mode"].as_str(), probe["images"].as_u64()), (Some("bpda"), Some(2)));
    let checks = v["sanity"].as_array().unwrap();
    let ran = |name: &str| checks.iter().any(|c| c["check"] == name && c["status"] != "not-run");
    assert!(ran("iterative-beats-one-step") && ran("unbounded-eps-reaches-zero"), "{checks:?}");
    assert!(ran("more-attacks-no-gain"));
}

/// `--grad-device` names a device this build has, or the run is refused before any work.
#[cfg(feature = "twin")]
#[test]
fn an_unavailable_gradient_device_is_refused() {
    let d = scratch("graddev");
    let data = synthetic_cifar(&d, "d.bin", 1, 0);
    let attack = |dev: &str| {
        diffshield(&[
            "attack",
            "--data",
            data.to_str().unwrap(),
            "--limit",
            "1",
            "--mode",
            "bpda",
            "--pgd-steps",
            "1",
            "--eot",
            "1",
            "--runs",
            "1",
            "--grad-device",
            dev,
        ])
    };
    assert_user_error(&attack("gpu"), "expected cpu or wgpu");
    #[cfg(not(feature = "wgpu"))]
    assert_user_error(&attack("wgpu"), "--features wgpu");
}

/// The on/off switches take 0 or 1: `off` read as "not 0" would measure the path it meant to
/// turn off, so any other value is a named user error before any work.
#[test]
fn measurement_switches_refuse_values_other_than_0_and_1() {
    let d = scratch("switches");
    let data = synthetic_cifar(&d, "d.bin", 2, 4);
    let run = |name: &str, value: &str| {
        Command::new(env!("CARGO_BIN_EXE_diffshield"))
            .args(["eval", "--data", data.to_str().unwrap(), "--votes", "1", "--stride", "70"])
            .env(name, value)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("binary runs")
    };
    for name in ["DIFFSHIELD_TRACT_ONLY", "DIFFSHIELD_WINOGRAD", "DIFFSHIELD_TRACT_THREADS"] {
        assert_user_error(&run(name, "off"), &format!("{name}=\"off\": use 0 or 1"));
        let on = run(name, "0");
        assert!(on.status.success(), "{name}=0: {}", String::from_utf8_lossy(&on.stderr));
    }
}

/// Kernel levels from the environment: a level the CPU lacks or a typo is a named user error;
/// int8 where our VNNI kernel cannot run says it is slower than f32 there (forced avx2 here,
/// where the CPU has AVX2; otherwise the test says it did not run that case).
#[test]
fn forced_kernel_levels_are_checked_and_int8_without_vnni_runs_f32() {
    let d = scratch("int8-fallback");
    let data = synthetic_cifar(&d, "d.bin", 2, 4);
    let run = |level: &str, extra: &[&str]| {
        let mut args = vec!["eval", "--data", data.to_str().unwrap(), "--votes", "1"];
        args.extend_from_slice(&["--stride", "70", "--seed", "1"]);
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_diffshield"))
            .args(&args)
            .env("DIFFSHIELD_KERNELS", level)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("binary runs")
    };
    assert_user_error(&run("neon", &[]), "unknown kernel level \"neon\"");
    let portable = run("portable", &[]);
    assert!(portable.status.success(), "{}", String::from_utf8_lossy(&portable.stderr));
    // The portable kernels in their aarch64 configuration run where the CPU has AVX2 + FMA and
    // are refused by name elsewhere.
    #[cfg(target_arch = "x86_64")]
    let fma_cpu =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let fma_cpu = false;
    let portable_fma = run("portable-fma", &[]);
    if fma_cpu {
        let err = String::from_utf8_lossy(&portable_fma.stderr);
        assert!(portable_fma.status.success(), "{err}");
    } else {
        assert_user_error(&portable_fma, "kernel level portable-fma needs AVX2 and FMA");
    }
    let precision = |out: &Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("eval JSON");
        (v["config"]["precision"].as_str().unwrap_or_default().to_string(), err)
    };
    // Without our VNNI kernel (the portable level has none) int8 runs the f32 models, says so,
    // and the output's configuration says what ran.
    let (p, err) = precision(&run("portable", &["--precision", "int8"]));
    assert_eq!(p, "f32", "{err}");
    assert!(err.contains("running the f32 models"), "{err}");
    // Forcing tract's own ops keeps tract's int8.
    let (p, err) = precision(&run("tract", &["--precision", "int8"]));
    assert_eq!(p, "int8", "{err}");
    assert!(!err.contains("running the f32 models"), "{err}");
}
