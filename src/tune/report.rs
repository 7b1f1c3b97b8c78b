//! The sweep's reports: `tune.csv` (one row per point), `pareto.md` (the frontier as a Markdown
//! table), `summary.json`, and the two plots (see [`super::plot`]).

use super::grid::{fmt_f64, PlanChoice};
use super::{MeasureSettings, OutputFiles, PointResult, TuneOutcome};
use crate::error::Result;
use crate::files::write_atomically;
use serde_json::json;
use std::path::Path;

/// The CSV header (column names).
pub const CSV_COLUMNS: [&str; 26] = [
    "label",
    "denoiser",
    "t_star",
    "stride",
    "steps_spec",
    "ddim_steps",
    "eta",
    "votes",
    "threads",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "cpu_p50_ms",
    "latency_frames",
    "clean_acc",
    "clean_images",
    "attack",
    "clean_acc_attacked",
    "robust_acc",
    "robust_acc_worst",
    "attack_images",
    "runs",
    "pareto",
    "measure_s",
    "cached",
    "key_hash",
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The CSV text: a header and one row per result, in `results` order.
pub fn csv(results: &[PointResult], on_frontier: &[bool]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for (r, &front) in results.iter().zip(on_frontier) {
        let p = &r.point;
        let (stride, steps) = match p.plan {
            PlanChoice::Stride(s) => (Some(s), None),
            PlanChoice::Steps(n) => (None, Some(n)),
        };
        let rob = r.robust.as_ref();
        let row = [
            csv_field(&r.label),
            csv_field(&p.denoiser),
            p.t_star.to_string(),
            opt(stride),
            opt(steps),
            r.steps().to_string(),
            fmt_f64(p.eta),
            p.votes.to_string(),
            p.threads.to_string(),
            format!("{:.2}", r.latency.p50_ms),
            format!("{:.2}", r.latency.p99_ms),
            format!("{:.2}", r.latency.mean_ms),
            opt(r.latency.cpu_p50_ms.map(|v| format!("{v:.2}"))),
            r.latency.frames.to_string(),
            format!("{:.4}", r.clean_acc),
            r.clean_images.to_string(),
            csv_field(&rob.map(|r| r.attack.clone()).unwrap_or_else(|| "none".into())),
            opt(rob.and_then(|r| r.clean_acc).map(|v| format!("{v:.4}"))),
            opt(rob.map(|r| format!("{:.4}", r.mean))),
            opt(rob.map(|r| format!("{:.4}", r.worst))),
            opt(rob.map(|r| r.images)),
            opt(rob.map(|r| r.runs)),
            front.to_string(),
            format!("{:.1}", r.seconds),
            r.cached.to_string(),
            format!("{:016x}", super::cache::key_hash(&r.key)),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

fn pct(v: f64) -> String {
    format!("{:.1} %", v * 100.0)
}

/// The frontier points (sorted by p50 latency) as a Markdown table, with a line saying how
/// they were measured.
pub fn markdown(outcome: &TuneOutcome, settings: &MeasureSettings) -> String {
    let robust = settings.attack.kind.is_some();
    let mut s = String::new();
    s.push_str(&format!(
        "Pareto frontier of {} against p50 latency ({}; {} of {} points). Latency: single \
         defended frames (batch 1, all votes), {} timed after {} warm-up; clean accuracy: first \
         {} images of {}; robust accuracy: {}.\n\n",
        if robust { "robust accuracy" } else { "clean accuracy" },
        match outcome.clock {
            super::LatencyClock::Cpu => "CPU time of the deciding thread",
            _ => "wall clock",
        },
        outcome.frontier.len(),
        outcome.results.len(),
        settings.clean_images,
        settings.warmup,
        settings.clean_images,
        settings.data.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        settings.attack.describe(),
    ));
    s.push_str(
        "| denoiser | T* | plan | DDIM steps | eta | votes | threads | p50 ms | p99 ms | CPU p50 \
         ms | clean acc | clean acc, attacked images | robust acc (mean / worst) |\n|---|---|---|---|---|---|---|---|---|---|---|\
         ---|---|\n",
    );
    for &i in &outcome.frontier {
        let r = &outcome.results[i];
        let p = &r.point;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |\n",
            p.denoiser,
            p.t_star,
            p.plan,
            r.steps(),
            fmt_f64(p.eta),
            p.votes,
            p.threads,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.cpu_p50_ms.map_or("n/a".to_string(), |v| format!("{v:.1}")),
            pct(r.clean_acc),
            r.robust.as_ref().and_then(|x| x.clean_acc).map_or("n/a".to_string(), pct),
            r.robust.as_ref().map_or("n/a".to_string(), |x| format!(
                "{} / {}",
                pct(x.mean),
                pct(x.worst)
            )),
        ));
    }
    s
}

/// The JSON summary: counts, settings, files, and the frontier points.
pub fn summary(
    outcome: &TuneOutcome,
    settings: &MeasureSettings,
    files: Option<&OutputFiles>,
) -> serde_json::Value {
    let point = |i: usize| {
        let r = &outcome.results[i];
        json!({
            "label": r.label,
            "point": r.point,
            "ddim_steps": r.steps(),
            "p50_ms": r.latency.p50_ms,
            "p99_ms": r.latency.p99_ms,
            "cpu_p50_ms": r.latency.cpu_p50_ms,
            "clean_acc": r.clean_acc,
            "clean_acc_attacked": r.robust.as_ref().and_then(|x| x.clean_acc),
            "robust_acc": r.robust.as_ref().map(|x| x.mean),
            "robust_acc_worst": r.robust.as_ref().map(|x| x.worst),
            "cached": r.cached,
        })
    };
    json!({
        "points": outcome.results.len(),
        "measured": outcome.measured,
        "cached": outcome.cached,
        "pending": outcome.pending,
        "seconds": outcome.seconds,
        "latency_clock": outcome.clock,
        "frontier_on": if settings.attack.kind.is_none() { "clean_acc" } else { "robust_acc" },
        "settings": {
            "data": settings.data.display().to_string(),
            "images": settings.clean_images,
            "warmup": settings.warmup,
            "attack": settings.attack.describe(),
            "seed": settings.base.seed,
        },
        "files": files,
        "frontier": outcome.frontier.iter().map(|&i| point(i)).collect::<Vec<_>>(),
    })
}

/// Writes `tune.csv`, `pareto.md`, `pareto.svg`, `depth.svg` and `summary.json` under `out`.
pub fn write_all(
    outcome: &TuneOutcome,
    settings: &MeasureSettings,
    out: &Path,
) -> Result<OutputFiles> {
    let files = OutputFiles {
        csv: out.join("tune.csv"),
        markdown: out.join("pareto.md"),
        pareto_svg: out.join("pareto.svg"),
        depth_svg: out.join("depth.svg"),
        summary: out.join("summary.json"),
    };
    crate::files::create_dir(out)?;
    write_atomically(&files.csv, csv(&outcome.results, &outcome.on_frontier).as_bytes())?;
    write_atomically(&files.markdown, markdown(outcome, settings).as_bytes())?;
    let robust_label = match settings.attack.kind {
        None => "clean accuracy (%)".to_string(),
        _ => format!("robust accuracy (%), {}", settings.attack.describe()),
    };
    let svg = super::plot::pareto_svg(outcome, &robust_label)?;
    write_atomically(&files.pareto_svg, svg.as_bytes())?;
    let svg = super::plot::depth_svg(&outcome.results, &settings.attack.describe())?;
    write_atomically(&files.depth_svg, svg.as_bytes())?;
    let text = serde_json::to_string_pretty(&summary(outcome, settings, Some(&files)))
        .map_err(|e| crate::Error::Backend(e.to_string()))?;
    write_atomically(&files.summary, text.as_bytes())?;
    Ok(files)
}
