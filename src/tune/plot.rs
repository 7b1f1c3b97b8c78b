//! The sweep's two plots, as SVG text (plotters' SVG backend; its text needs no system fonts):
//! robust accuracy against p50 latency with the Pareto frontier marked, and clean and robust
//! accuracy against T* (the paper's Figure 4).

use super::{PointResult, TuneOutcome};
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;

fn plot_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Backend(format!("drawing a plot: {e}"))
}

const FRONTIER: RGBColor = RGBColor(200, 30, 30);
const DOMINATED: RGBColor = RGBColor(150, 150, 150);

/// Robust accuracy (or clean accuracy, without an attack) against p50 latency on a log axis:
/// dominated points grey, frontier points red, labelled and joined by the frontier's staircase.
/// Denoiser s points are circles, others triangles.
pub fn pareto_svg(outcome: &TuneOutcome, y_desc: &str) -> Result<String> {
    let res = &outcome.results;
    let clock = outcome.clock;
    let xs: Vec<f64> = res.iter().map(|r| r.p50_ms(clock)).filter(|x| x.is_finite()).collect();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 { (lo * 0.8, hi * 1.6) } else { (1.0, 1000.0) };
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1000, 680)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("diffshield tune: accuracy against latency", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (lo.max(1e-3)..hi).log_scale().with_key_points(log_ticks(lo, hi)),
                0f64..100f64,
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(match clock {
                super::LatencyClock::Cpu => {
                    "p50 latency of one defended frame, CPU time of the deciding thread (ms, log \
                     scale)"
                }
                _ => "p50 latency of one defended frame, wall clock (ms, log scale)",
            })
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        let xy = |r: &PointResult| (r.p50_ms(clock), r.objective() * 100.0);
        let marker = |r: &PointResult, color: RGBColor| -> DynElement<'static, _, (f64, f64)> {
            if r.point.denoiser == "s" {
                Circle::new(xy(r), 5, color.filled()).into_dyn()
            } else {
                TriangleMarker::new(xy(r), 7, color.filled()).into_dyn()
            }
        };
        let dominated: Vec<&PointResult> =
            res.iter().zip(&outcome.on_frontier).filter(|(_, &f)| !f).map(|(r, _)| r).collect();
        chart
            .draw_series(dominated.iter().map(|r| marker(r, DOMINATED)))
            .map_err(plot_err)?
            .label("dominated")
            .legend(|(x, y)| Circle::new((x + 8, y), 5, DOMINATED.filled()));
        let front: Vec<&PointResult> = outcome.frontier.iter().map(|&i| &res[i]).collect();
        let mut stairs = Vec::new();
        for (k, r) in front.iter().enumerate() {
            let (x, y) = xy(r);
            if k > 0 {
                stairs.push((x, stairs.last().map_or(y, |p: &(f64, f64)| p.1)));
            }
            stairs.push((x, y));
        }
        if let Some(&(_, y)) = stairs.last() {
            stairs.push((hi, y));
        }
        chart
            .draw_series(LineSeries::new(stairs, FRONTIER.stroke_width(2)))
            .map_err(plot_err)?
            .label("Pareto frontier")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], FRONTIER.stroke_width(2)));
        chart.draw_series(front.iter().map(|r| marker(r, FRONTIER))).map_err(plot_err)?;
        chart
            .draw_series(front.iter().map(|r| {
                // Beside the marker, not on it: up and to the right by a few pixels.
                EmptyElement::at(xy(r))
                    + Text::new(r.label.clone(), (7, -15), ("sans-serif", 12).into_font())
            }))
            .map_err(plot_err)?;
        if res.iter().any(|r| r.point.denoiser != "s") {
            // A legend entry for the marker shapes (no points of its own).
            chart
                .draw_series(std::iter::empty::<TriangleMarker<(f64, f64), i32>>())
                .map_err(plot_err)?
                .label("triangle: denoiser other than s")
                .legend(|(x, y)| TriangleMarker::new((x + 8, y), 6, DOMINATED.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(buf)
}

/// Round tick values (1, 2, 3, 5 times a power of ten) between `lo` and `hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    if !(lo > 0.0 && hi > lo) {
        return ticks;
    }
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let t = decade * m;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// The groups of points that differ only in T*, keyed by their label without T*; only the
/// groups with the most distinct T* values (at least two) are kept, so a depth sweep inside a
/// larger grid is plotted alone.
pub fn depth_groups(results: &[PointResult]) -> Vec<(String, Vec<&PointResult>)> {
    let mut groups: BTreeMap<String, Vec<&PointResult>> = BTreeMap::new();
    for r in results {
        let p = &r.point;
        let key = format!(
            "{} {} eta{} v{} t{}",
            p.denoiser,
            match p.plan {
                super::grid::PlanChoice::Stride(s) => format!("stride{s}"),
                super::grid::PlanChoice::Steps(n) => format!("{n}steps"),
            },
            super::grid::fmt_f64(p.eta),
            p.votes,
            p.threads
        );
        groups.entry(key).or_default().push(r);
    }
    for g in groups.values_mut() {
        g.sort_by_key(|r| r.point.t_star);
        g.dedup_by_key(|r| r.point.t_star);
    }
    let most = groups.values().map(Vec::len).max().unwrap_or(0);
    groups.into_iter().filter(|(_, g)| g.len() >= 2 && g.len() == most).collect()
}

/// Clean (solid, circles) and robust (dashed, triangles) accuracy against T*, one colour per
/// group of points that differ only in T* (see [`depth_groups`]).
pub fn depth_svg(results: &[PointResult], attack: &str) -> Result<String> {
    let groups = depth_groups(results);
    let max_t = results.iter().map(|r| r.point.t_star).max().unwrap_or(100);
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1000, 680)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Accuracy against diffusion depth T* (cf. the paper's Figure 4)",
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..f64::from(max_t) * 1.05 + 1.0, 0f64..100f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("T* (diffusion steps the input is noised to)")
            .y_desc("accuracy (%)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        if groups.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    "no points that differ only in T*: add T* values to the grid",
                    (f64::from(max_t) * 0.05, 50.0),
                    ("sans-serif", 16),
                )))
                .map_err(plot_err)?;
        }
        for (k, (name, pts)) in groups.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let clean: Vec<(f64, f64)> =
                pts.iter().map(|r| (f64::from(r.point.t_star), r.clean_acc * 100.0)).collect();
            chart
                .draw_series(LineSeries::new(clean.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(format!("clean, {name}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(clean.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(plot_err)?;
            let clean_m: Vec<(f64, f64)> = pts
                .iter()
                .filter_map(|r| {
                    let c = r.robust.as_ref()?.clean_acc?;
                    Some((f64::from(r.point.t_star), c * 100.0))
                })
                .collect();
            if !clean_m.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(clean_m, 2, 4, color.stroke_width(1)))
                    .map_err(plot_err)?
                    .label(format!("clean, attacked images only, {name}"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 2, y)], color.stroke_width(1))
                    });
            }
            let robust: Vec<(f64, f64)> = pts
                .iter()
                .filter_map(|r| {
                    r.robust.as_ref().map(|x| (f64::from(r.point.t_star), x.mean * 100.0))
                })
                .collect();
            if !robust.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(robust.clone(), 8, 5, color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(format!("robust ({attack}), {name}"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 6, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(robust.iter().map(|&p| TriangleMarker::new(p, 6, color.filled())))
                    .map_err(plot_err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(buf)
}
