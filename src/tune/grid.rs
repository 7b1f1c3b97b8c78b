//! The grid a sweep measures: axes (T*, stride or steps, eta, votes, denoiser, threads) from
//! comma-separated command-line lists and/or a TOML file, expanded into grid points.
//!
//! A grid file is either one table of axes or several `[[grid]]` tables whose products are
//! joined (duplicates measured once):
//!
//! ```toml
//! [[grid]]                 # the depth sweep
//! t_star = [20, 60, 100]
//! steps = [4]
//! [[grid]]
//! t_star = [60]
//! stride = [10, 20]
//! votes = [1, 3]
//! ```
//!
//! An axis that a grid does not name takes the default configuration's single value
//! (denoiser s, stride 10, eta 1), except votes: 1, not the runtime's default of 3, so that a
//! sweep compares single purifications unless votes are one of its axes, and threads: 1, not
//! the runtime's one per core, so that the frontier can rank points by the deciding thread's CPU
//! time, which other load on the machine disturbs least (and a sweep's points compare across
//! machines). Axes given on the command line replace the same axis in every grid of the file.

use crate::config::{DefenseConfig, DEFAULT_STRIDE};
use crate::error::{Error, Result};
use crate::schedule::PlanSpec;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Votes of a grid without a votes axis (see the module doc).
const UNNAMED_VOTES: u32 = 1;
/// Threads of a grid without a threads axis (see the module doc).
const UNNAMED_THREADS: usize = 1;

/// Largest T* any grid may name; the denoiser's trained range (models.toml) is checked later
/// and may be narrower.
pub const MAX_T_STAR: u32 = 500;

/// How a grid point picks its DDIM timesteps below T*.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanChoice {
    /// tau = T*, T*-stride, ..., 0.
    Stride(u32),
    /// That many evenly spaced steps from T* to 0.
    Steps(u32),
}

impl PlanChoice {
    /// The plan specification of the configuration.
    pub fn spec(&self) -> PlanSpec {
        match *self {
            PlanChoice::Stride(s) => PlanSpec::Stride(s),
            PlanChoice::Steps(n) => PlanSpec::Steps(n),
        }
    }
}

impl fmt::Display for PlanChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanChoice::Stride(s) => write!(f, "stride:{s}"),
            PlanChoice::Steps(n) => write!(f, "steps:{n}"),
        }
    }
}

/// One configuration of the sweep (the knobs the grid varies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    /// Denoiser tier from models.toml.
    pub denoiser: String,
    /// Diffusion depth.
    pub t_star: u32,
    /// Stride or step count.
    pub plan: PlanChoice,
    /// Fresh noise per DDIM step.
    pub eta: f64,
    /// Purifications per frame.
    pub votes: u32,
    /// CPU threads.
    pub threads: usize,
}

impl GridPoint {
    /// A canonical, stable text form of the point (part of its cache key).
    pub fn canonical(&self) -> String {
        format!(
            "denoiser={};t_star={};plan={};eta={};votes={};threads={}",
            self.denoiser,
            self.t_star,
            self.plan,
            fmt_f64(self.eta),
            self.votes,
            self.threads
        )
    }

    /// A short label for plots and tables, e.g. `s T*140 stride10 eta1 v3 t1`.
    pub fn label(&self) -> String {
        let plan = match self.plan {
            PlanChoice::Stride(s) => format!("stride{s}"),
            PlanChoice::Steps(n) => format!("{n}steps"),
        };
        format!(
            "{} T*{} {} eta{} v{} t{}",
            self.denoiser,
            self.t_star,
            plan,
            fmt_f64(self.eta),
            self.votes,
            self.threads
        )
    }

    /// The full configuration: `base` with this point's knobs set.
    pub fn config(&self, base: &DefenseConfig) -> DefenseConfig {
        let mut c = base.clone();
        c.denoiser = self.denoiser.clone();
        c.t_star = self.t_star;
        c.stride = None;
        c.steps = None;
        c.timesteps = None;
        match self.plan {
            PlanChoice::Stride(s) => c.stride = Some(s),
            PlanChoice::Steps(n) => c.steps = Some(n),
        }
        c.eta = self.eta;
        c.votes = self.votes;
        c.min_votes = c.min_votes.min(self.votes).max(1);
        c.threads = self.threads;
        c
    }
}

/// Shortest text that parses back to the same f64 (Rust's `Display` for f64 is that).
pub(crate) fn fmt_f64(v: f64) -> String {
    format!("{v}")
}

/// The axes of one grid; `None` is an axis the grid does not name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridAxes {
    /// Diffusion depths.
    pub t_star: Option<Vec<u32>>,
    /// DDIM strides.
    pub stride: Option<Vec<u32>>,
    /// DDIM step counts (joined with the strides: each is one plan choice).
    pub steps: Option<Vec<u32>>,
    /// Fresh-noise scales.
    pub eta: Option<Vec<f64>>,
    /// Votes per frame.
    pub votes: Option<Vec<u32>>,
    /// Denoiser tiers.
    pub denoiser: Option<Vec<String>>,
    /// CPU thread counts.
    pub threads: Option<Vec<usize>>,
}

/// The axis names, as on the command line (`--t-star`) and in TOML (`t_star`).
pub const AXES: [&str; 7] = ["t_star", "stride", "steps", "eta", "votes", "denoiser", "threads"];

fn parse_list<T: std::str::FromStr>(axis: &str, list: &str) -> Result<Vec<T>> {
    if list.trim().is_empty() {
        return Err(Error::InvalidConfig(format!("tune grid: --{} is an empty list", dash(axis))));
    }
    list.split(',')
        .map(|v| {
            let v = v.trim();
            v.parse().map_err(|_| {
                Error::InvalidConfig(format!(
                    "tune grid: --{} value {v:?} is not a valid {}",
                    dash(axis),
                    match axis {
                        "eta" => "number",
                        "denoiser" => "tier name",
                        _ => "non-negative integer",
                    }
                ))
            })
        })
        .collect()
}

fn dash(axis: &str) -> String {
    axis.replace('_', "-")
}

impl GridAxes {
    /// True when no axis is named.
    pub fn is_empty(&self) -> bool {
        self == &GridAxes::default()
    }

    /// Sets `axis` (`t_star` or `t-star`, ...) from a comma-separated list such as `20,60,100`.
    pub fn set(&mut self, axis: &str, list: &str) -> Result<()> {
        match axis.replace('-', "_").as_str() {
            "t_star" => self.t_star = Some(parse_list("t_star", list)?),
            "stride" => self.stride = Some(parse_list("stride", list)?),
            "steps" => self.steps = Some(parse_list("steps", list)?),
            "eta" => self.eta = Some(parse_list("eta", list)?),
            "votes" => self.votes = Some(parse_list("votes", list)?),
            "denoiser" => self.denoiser = Some(parse_list("denoiser", list)?),
            "threads" => self.threads = Some(parse_list("threads", list)?),
            other => {
                return Err(Error::InvalidConfig(format!(
                    "tune grid: unknown axis {other:?}; the axes are {}",
                    AXES.join(", ")
                )))
            }
        }
        self.validate()
    }

    /// This grid with every axis that `over` names replaced by `over`'s.
    pub fn overridden_by(&self, over: &GridAxes) -> GridAxes {
        let pick = |a: &Option<Vec<u32>>, b: &Option<Vec<u32>>| b.clone().or_else(|| a.clone());
        let mut g = GridAxes {
            t_star: pick(&self.t_star, &over.t_star),
            stride: self.stride.clone(),
            steps: self.steps.clone(),
            eta: over.eta.clone().or_else(|| self.eta.clone()),
            votes: pick(&self.votes, &over.votes),
            denoiser: over.denoiser.clone().or_else(|| self.denoiser.clone()),
            threads: over.threads.clone().or_else(|| self.threads.clone()),
        };
        // Stride and steps together are the plan axis: a command line naming either replaces both.
        if over.stride.is_some() || over.steps.is_some() {
            g.stride = over.stride.clone();
            g.steps = over.steps.clone();
        }
        g
    }

    /// Checks every value without the models (the denoiser's trained range is checked when the
    /// points are planned). Errors name the axis and the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("tune grid: {m}")));
        for (name, len) in [
            ("t_star", self.t_star.as_ref().map(Vec::len)),
            ("stride", self.stride.as_ref().map(Vec::len)),
            ("steps", self.steps.as_ref().map(Vec::len)),
            ("eta", self.eta.as_ref().map(Vec::len)),
            ("votes", self.votes.as_ref().map(Vec::len)),
            ("denoiser", self.denoiser.as_ref().map(Vec::len)),
            ("threads", self.threads.as_ref().map(Vec::len)),
        ] {
            if len == Some(0) {
                return bad(format!("{name} is an empty list"));
            }
        }
        for &t in self.t_star.iter().flatten() {
            if t == 0 || t > MAX_T_STAR {
                return bad(format!(
                    "t_star {t} is out of range: T* must lie in 1..={MAX_T_STAR} (the \
                     denoisers' trained range)"
                ));
            }
        }
        for &s in self.stride.iter().flatten() {
            if s == 0 {
                return bad("stride 0 is not allowed: a stride must be at least 1".into());
            }
        }
        for &n in self.steps.iter().flatten() {
            if n == 0 {
                return bad("steps 0 is not allowed: a plan needs at least 1 step".into());
            }
        }
        for &e in self.eta.iter().flatten() {
            if !e.is_finite() || !(0.0..=1.0).contains(&e) {
                return bad(format!("eta {e} is out of range: eta must lie in [0, 1]"));
            }
        }
        for &v in self.votes.iter().flatten() {
            if v == 0 {
                return bad("votes 0 is not allowed: a frame needs at least 1 vote".into());
            }
        }
        for &t in self.threads.iter().flatten() {
            if t == 0 {
                return bad("threads 0 is not allowed: at least 1 thread".into());
            }
        }
        for d in self.denoiser.iter().flatten() {
            if d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return bad(format!("denoiser {d:?} is not a tier name (e.g. s or m)"));
            }
        }
        Ok(())
    }

    /// The grid's points in a fixed order (denoiser, T*, plan, eta, votes, threads nested
    /// outermost to innermost); axes not named take the default configuration's value
    /// (votes and threads: 1, see the module doc).
    pub fn points(&self) -> Result<Vec<GridPoint>> {
        self.validate()?;
        let d = DefenseConfig::default();
        let one = |v| Some(vec![v]);
        let denoisers = self.denoiser.clone().unwrap_or_else(|| vec![d.denoiser.clone()]);
        let t_stars = self.t_star.clone().or_else(|| one(d.t_star)).unwrap_or_default();
        let mut plans: Vec<PlanChoice> = Vec::new();
        plans.extend(self.stride.iter().flatten().map(|&s| PlanChoice::Stride(s)));
        plans.extend(self.steps.iter().flatten().map(|&n| PlanChoice::Steps(n)));
        if plans.is_empty() {
            plans.push(PlanChoice::Stride(DEFAULT_STRIDE));
        }
        let etas = self.eta.clone().unwrap_or_else(|| vec![d.eta]);
        let votes = self.votes.clone().or_else(|| one(UNNAMED_VOTES)).unwrap_or_default();
        let threads = self.threads.clone().unwrap_or_else(|| vec![UNNAMED_THREADS]);
        let mut out = Vec::new();
        for den in &denoisers {
            for &t_star in &t_stars {
                for &plan in &plans {
                    if let PlanChoice::Steps(n) = plan {
                        if n > t_star {
                            return Err(Error::InvalidConfig(format!(
                                "tune grid: steps {n} do not fit below t_star {t_star} (at \
                                 most one step per timestep)"
                            )));
                        }
                    }
                    for &eta in &etas {
                        for &v in &votes {
                            for &th in &threads {
                                out.push(GridPoint {
                                    denoiser: den.clone(),
                                    t_star,
                                    plan,
                                    eta,
                                    votes: v,
                                    threads: th,
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A sweep's grid: the union of one or more grids' products.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// The grids, in file order.
    pub grids: Vec<GridAxes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    grid: Vec<GridAxes>,
}

/// The built-in grid of `diffshield tune` (sized to finish in under 30 minutes on the 2-core
/// development machine with the default measurement settings; see docs/tune.md).
pub const DEFAULT_GRID_TOML: &str = r#"
# The depth sweep (the paper's Figure 4): denoiser s, 4 DDIM steps, eta 1, one vote.
[[grid]]
denoiser = ["s"]
t_star = [20, 60, 100, 140, 200, 300]
steps = [4]
eta = [1.0]
votes = [1]

# Speed against robustness, denoiser s: depth, steps, eta and votes.
[[grid]]
denoiser = ["s"]
t_star = [60, 140]
steps = [1, 4]
eta = [0.0, 1.0]
votes = [1, 3]

# The larger denoiser m: depth and steps, eta 1, one vote.
[[grid]]
denoiser = ["m"]
t_star = [60, 140]
steps = [1, 4]
eta = [1.0]
votes = [1]
"#;

impl Grid {
    /// Parses a grid file's text: one table of axes, or `[[grid]]` tables. `origin` names the
    /// file in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Grid> {
        let err = |reason: String| Error::ConfigFile { path: origin.to_path_buf(), reason };
        let value: toml::Table =
            toml::from_str(text).map_err(|e| err(crate::files::toml_error(text, &e)))?;
        let grids = if value.contains_key("grid") {
            toml::from_str::<GridFile>(text)
                .map_err(|e| err(crate::files::toml_error(text, &e)))?
                .grid
        } else {
            vec![toml::from_str::<GridAxes>(text)
                .map_err(|e| err(crate::files::toml_error(text, &e)))?]
        };
        if grids.is_empty() {
            return Err(err("the file names no grid".into()));
        }
        for g in &grids {
            g.validate()?;
        }
        Ok(Grid { grids })
    }

    /// Reads a grid file.
    pub fn from_file(path: &Path) -> Result<Grid> {
        let text = crate::files::read_input_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.into(),
            reason: crate::files::reason(&e),
        })?;
        Self::from_toml_str(&text, path)
    }

    /// The built-in grid ([`DEFAULT_GRID_TOML`]).
    pub fn default_grid() -> Grid {
        Self::from_toml_str(DEFAULT_GRID_TOML, Path::new("<built-in grid>"))
            .expect("the built-in grid is valid")
    }

    /// The grid a command asks for: the file's grids with the command-line axes applied to
    /// each; without a file the command-line axes alone; with neither the built-in grid.
    pub fn resolve(file: Option<Grid>, cli: &GridAxes) -> Result<Grid> {
        cli.validate()?;
        Ok(match file {
            Some(f) => Grid { grids: f.grids.iter().map(|g| g.overridden_by(cli)).collect() },
            None if cli.is_empty() => Self::default_grid(),
            None => Grid { grids: vec![cli.clone()] },
        })
    }

    /// Every distinct point, in grid order (first occurrence kept).
    pub fn points(&self) -> Result<Vec<GridPoint>> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for g in &self.grids {
            for p in g.points()? {
                if seen.insert(p.canonical()) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}
