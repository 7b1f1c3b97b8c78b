//! Progress on stderr: a bar on a terminal; elsewhere (a CI log, a file) one plain line every
//! [`LOG_EVERY`], so that a ten-hour attack shows it is alive instead of nothing.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Interval between progress lines when stderr is not a terminal (`DIFFSHIELD_PROGRESS_EVERY_S`
/// sets another, in seconds).
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// The interval of the progress lines: `DIFFSHIELD_PROGRESS_EVERY_S` seconds when that is a
/// number of seconds, else [`LOG_EVERY`], with a warning naming a value that is not one (it
/// only paces the log, so it does not stop the job).
fn log_every() -> Duration {
    const NAME: &str = "DIFFSHIELD_PROGRESS_EVERY_S";
    let Ok(value) = std::env::var(NAME) else { return LOG_EVERY };
    match value.trim().parse::<f64>().ok().and_then(|s| Duration::try_from_secs_f64(s).ok()) {
        Some(every) => every,
        None => {
            // Once a process: a job may show several progress displays.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                log::warn!(
                    "ignoring {NAME}={value:?} (not a number of seconds): progress every {} s",
                    LOG_EVERY.as_secs()
                )
            });
            LOG_EVERY
        }
    }
}

/// A progress display for `len` steps of `what`.
pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    len: u64,
    pos: u64,
    started: Instant,
    logged: Instant,
    every: Duration,
}

impl Progress {
    pub fn new(len: usize, what: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(len as u64);
            bar.set_style(
                ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(what.to_string());
            bar
        });
        let now = Instant::now();
        let every = log_every();
        let (what, len) = (what.to_string(), len as u64);
        Self { bar, what, len, pos: 0, started: now, logged: now, every }
    }

    /// The step count is now `pos`.
    pub fn set_position(&mut self, pos: u64) {
        self.pos = pos;
        match &self.bar {
            Some(bar) => bar.set_position(pos),
            None if self.logged.elapsed() >= self.every => {
                self.logged = Instant::now();
                self.log();
            }
            None => {}
        }
    }

    /// `n` more steps are done.
    pub fn inc(&mut self, n: u64) {
        self.set_position(self.pos + n);
    }

    /// What is being worked on now.
    pub fn set_message(&mut self, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        } else {
            self.what = msg;
        }
    }

    fn log(&self) {
        eprintln!(
            "{}: {}/{} after {:.0} s",
            self.what,
            self.pos,
            self.len,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Removes the bar (on a terminal) or logs the final count (elsewhere, when it took long
    /// enough to have logged before).
    pub fn finish(self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None if self.started.elapsed() >= self.every => self.log(),
            None => {}
        }
    }
}
