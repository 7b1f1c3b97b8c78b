//! Everything the CLI prints on stdout: decision lines, the stream summary and the eval report,
//! as JSON lines (each with a `"type"`) or as text for people; and the exit code, where a
//! closed stdout (`| head`) ends the program quietly and a full disk is an error naming stdout.

use diffshield::defense::Accuracy;
use diffshield::stream::LatencySummary;
use diffshield::{Decision, Defense, Error};
use serde_json::{json, Value};
use std::io::{BufWriter, ErrorKind, Stdout, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line, each with a "type" ("decision", "summary", "eval").
    Json,
    /// One line of text per result, for people.
    Text,
}

/// The path stdout errors are reported under.
const STDOUT: &str = "stdout";

/// stdout in the chosen format, buffered; every write error names stdout.
pub struct Out {
    format: Format,
    w: BufWriter<Stdout>,
}

fn stdout_error(source: std::io::Error) -> Error {
    Error::Io { path: PathBuf::from(STDOUT), source }
}

/// Whether `e` is a failed write to stdout.
pub fn is_stdout_error(e: &Error) -> bool {
    matches!(e, Error::Io { path, .. } if path == Path::new(STDOUT))
}

fn round(v: f64, scale: f64) -> f64 {
    if v.is_finite() {
        (v * scale).round() / scale
    } else {
        v
    }
}

impl Out {
    pub fn new(format: Format) -> Self {
        Self { format, w: BufWriter::new(std::io::stdout()) }
    }

    fn line(&mut self, text: &str) -> diffshield::Result<()> {
        writeln!(self.w, "{text}").map_err(stdout_error)
    }

    fn json(&mut self, mut v: Value, kind: &str) -> diffshield::Result<()> {
        if let Some(map) = v.as_object_mut() {
            map.insert("type".into(), json!(kind));
        }
        self.line(&v.to_string())
    }

    /// One decision: with where the frame came from, its true label where known, and for a
    /// stream its latency and queueing time (ms).
    pub fn decision(
        &mut self,
        d: &Decision,
        source: &str,
        true_label: Option<u8>,
        stream: Option<(f64, f64)>,
    ) -> diffshield::Result<()> {
        match self.format {
            Format::Json => {
                let mut v = serde_json::to_value(d)
                    .map_err(|e| Error::Backend(format!("serialising a decision: {e}")))?;
                v["source"] = json!(source);
                if let Some(l) = true_label {
                    v["true_label"] = json!(l);
                }
                if let Some((latency, queued)) = stream {
                    v["latency_ms"] = json!(round(latency, 1e3));
                    v["queued_ms"] = json!(round(queued, 1e3));
                }
                self.json(v, "decision")
            }
            Format::Text => {
                let top: Vec<String> =
                    d.top_k.iter().map(|c| format!("{} {:.2}", c.class, c.prob)).collect();
                let verdict = match d.label {
                    Some(_) => d.class.clone(),
                    None => format!("unknown (below the confidence threshold: {})", top.join(", ")),
                };
                let mut text = format!(
                    "{source}: {verdict}  p={:.2}, votes {}/{}  top: {}  [{} steps, {:.1} ms",
                    d.confidence.mean_prob,
                    (d.confidence.vote_share * d.vote_labels.len() as f32).round(),
                    d.vote_labels.len(),
                    top.join(", "),
                    d.steps,
                    d.purify_ms + d.classify_ms
                );
                if let Some((latency, _)) = stream {
                    text += &format!(", latency {latency:.1} ms");
                }
                if d.deadline_met == Some(false) {
                    text += ", deadline missed";
                }
                if let Some(l) = true_label {
                    text += &format!(", true label {l}");
                }
                text += &format!(", frame {}, seed {}]", d.frame, d.seed);
                self.line(&text)
            }
        }
    }

    /// The stream's last line.
    pub fn summary(&mut self, s: &LatencySummary, seed: u64) -> diffshield::Result<()> {
        match self.format {
            Format::Json => {
                let mut v = serde_json::to_value(s)
                    .map_err(|e| Error::Backend(format!("serialising the summary: {e}")))?;
                for k in ["p50_ms", "p95_ms", "p99_ms"] {
                    if let Some(x) = v[k].as_f64() {
                        v[k] = json!(round(x, 1e3));
                    }
                }
                v["seed"] = json!(seed);
                self.json(v, "summary")
            }
            Format::Text => self.line(&format!("{s} seed={seed}")),
        }
    }

    /// `eval`'s report.
    pub fn eval(&mut self, data: &Path, a: &Accuracy, defense: &Defense) -> diffshield::Result<()> {
        let pct = |v: f64| format!("{:.1} %", 100.0 * v);
        match self.format {
            Format::Json => {
                let mut v = json!({
                    "data": data.display().to_string(),
                    "images": a.images,
                    "clean_acc": a.clean_acc,
                    "purified_acc": a.purified_acc,
                    "abstained": a.abstained,
                    "seed": defense.seed(),
                    "config": defense.config(),
                    "plan_timesteps": defense.timesteps(),
                    "ms": {
                        "clean": round(a.clean_ms, 1e3),
                        "purified": a.purified_ms.map(|m| round(m, 1e3)),
                    },
                });
                if let (Some(missed), Some(steps)) = (a.deadline_missed, a.mean_steps) {
                    v["deadline_missed"] = json!(missed);
                    v["mean_steps"] = json!(steps);
                }
                self.json(v, "eval")
            }
            Format::Text => {
                let defended = a.purified_acc.map_or("not measured".into(), pct);
                self.line(&format!(
                    "{}: {} images, classifier alone {}, defended {defended} ({} steps from T*={}, \
                     {} vote(s), seed {}), {:.1} s",
                    data.display(),
                    a.images,
                    pct(a.clean_acc),
                    defense.timesteps().len().saturating_sub(1),
                    defense.config().t_star,
                    defense.config().votes,
                    defense.seed(),
                    (a.clean_ms + a.purified_ms.unwrap_or(0.0)) / 1e3
                ))
            }
        }
    }

    /// Flushes stdout.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.w.flush().map_err(stdout_error)?;
        Ok(())
    }
}

/// The process's exit code for a command's result (see the module doc).
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    let Err(e) = result else { return ExitCode::SUCCESS };
    let lib = e.downcast_ref::<Error>();
    if let Some(Error::Io { path, source }) = lib {
        if path == Path::new(STDOUT) {
            if source.kind() == ErrorKind::BrokenPipe {
                // The reader went away (`| head`): nothing left to say to anyone.
                return ExitCode::SUCCESS;
            }
            eprintln!("error: cannot write the results to stdout: {source}");
            return ExitCode::from(1);
        }
    }
    eprintln!("error: {}", error_text(&e));
    let user = lib.is_none_or(|e| e.is_user_error());
    ExitCode::from(if user { 2 } else { 1 })
}

/// An error and its causes on one line, each cause once: a library error's message already
/// includes its source's text, which `{:#}` would repeat.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !text.contains(&c) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&c);
        }
    }
    text
}
