//! The model manifest (models/models.toml): which file plays which role, its tensor names and
//! shapes, the class names, the diffusion schedule and the denoisers' trained t range.

use crate::error::{Error, Result};
use crate::schedule::Schedule;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// The manifest's file name inside a models folder (outside this module: [`Manifest::path_in`]).
const MANIFEST_FILE: &str = "models.toml";

/// The whole manifest, with the folder it was read from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Diffusion schedule shared by every denoiser.
    pub schedule: ScheduleEntry,
    /// The classifier: the undefended mode's, and the defended pipeline's too unless
    /// `defended_classifier` names another.
    pub classifier: ClassifierEntry,
    /// The classifier the defended pipeline and every attack on it use instead of
    /// `classifier` (one fine-tuned on purified images, training/README.md).
    #[serde(default)]
    pub defended_classifier: Option<DefendedClassifierEntry>,
    /// Denoisers by tier name ("m", "s", ...).
    pub denoisers: BTreeMap<String, DenoiserEntry>,
    #[serde(skip)]
    dir: PathBuf,
}

/// The `[schedule]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Only "linear" is known.
    pub kind: String,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// Number of noising steps T.
    pub steps: u32,
}

/// The `[classifier]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierEntry {
    /// ONNX file, relative to the manifest's folder.
    pub file: String,
    /// Optional int8 (QOperator) version of `file`, same tensors, used with `precision = "int8"`.
    #[serde(default)]
    pub int8_file: Option<String>,
    /// Name of the image input.
    pub input: String,
    /// Name of the logits output.
    pub output: String,
    /// Input shape without the batch dimension, [C, H, W].
    pub input_shape: [usize; 3],
    /// Class names in logit order.
    pub classes: Vec<String>,
}

/// The optional `[defended_classifier]` table: another file of the same network interface
/// (input, output, shape and classes come from `[classifier]` and are checked against the file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefendedClassifierEntry {
    /// ONNX file, relative to the manifest's folder.
    pub file: String,
    /// Optional int8 (QOperator) version of `file`, used with `precision = "int8"`.
    #[serde(default)]
    pub int8_file: Option<String>,
}

/// Which classifier a job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierRole {
    /// `[classifier]`: the bare classifier of the undefended mode.
    Bare,
    /// `[defended_classifier]` where the manifest has one, else `[classifier]`: what the
    /// defended pipeline runs after the purifier.
    Defended,
}

/// A `[denoisers.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserEntry {
    /// ONNX file, relative to the manifest's folder.
    pub file: String,
    /// Optional int8 (QOperator) version of `file`, same tensors, used with `precision = "int8"`.
    #[serde(default)]
    pub int8_file: Option<String>,
    /// Name of the x_t input.
    pub input: String,
    /// Name of the timestep input.
    pub t_input: String,
    /// Name of the eps output.
    pub output: String,
    /// Input shape without the batch dimension, [C, H, W].
    pub input_shape: [usize; 3],
    /// Inclusive range of t the model was trained on.
    pub trained_t: [u32; 2],
}

impl DenoiserEntry {
    /// The trained t range as a Rust range.
    pub fn trained_range(&self) -> RangeInclusive<u32> {
        self.trained_t[0]..=self.trained_t[1]
    }
}

impl Manifest {
    /// The manifest file of the models folder `dir` (`DIR/models.toml`).
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads `DIR/models.toml`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::path_in(dir);
        let text = crate::files::read_input_to_string(&path).map_err(|e| {
            let hint = match &e {
                Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    format!(
                        "; point --models (config key `models`, or {}) at the folder holding it",
                        crate::config::MODELS_ENV
                    )
                }
                _ => String::new(),
            };
            Error::Manifest {
                path: path.clone(),
                reason: format!("{}{hint}", crate::files::reason(&e)),
            }
        })?;
        let mut m: Manifest = toml::from_str(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: crate::files::toml_error(&text, &e),
        })?;
        m.dir = dir.to_path_buf();
        m.check(&path)?;
        Ok(m)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Manifest { path: path.to_path_buf(), reason };
        if self.schedule.kind != "linear" {
            return Err(bad(format!("unknown schedule kind {:?}", self.schedule.kind)));
        }
        let max = crate::schedule::MAX_SCHEDULE_STEPS;
        if !(2..=max).contains(&self.schedule.steps) {
            return Err(bad(format!(
                "[schedule] steps = {} must be in 2..={max}",
                self.schedule.steps
            )));
        }
        if self.classifier.classes.is_empty() {
            return Err(bad("classifier has no class names".into()));
        }
        let c = &self.classifier;
        let mut files = vec![("classifier file", c.file.as_str())];
        files.extend(c.int8_file.as_deref().map(|f| ("classifier int8_file", f)));
        if let Some(d) = &self.defended_classifier {
            files.push(("defended_classifier file", d.file.as_str()));
            files.extend(d.int8_file.as_deref().map(|f| ("defended_classifier int8_file", f)));
        }
        for d in self.denoisers.values() {
            files.push(("denoiser file", d.file.as_str()));
            files.extend(d.int8_file.as_deref().map(|f| ("denoiser int8_file", f)));
        }
        for (what, file) in files {
            // Model files stay inside the models folder: no absolute path, no `..`.
            let inside = std::path::Path::new(file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || file.is_empty() {
                return Err(bad(format!(
                    "{what} {file:?} must be a path inside the models folder (no absolute \
                     path, no ..)"
                )));
            }
        }
        for (name, d) in &self.denoisers {
            let [lo, hi] = d.trained_t;
            if lo < 1 || lo > hi || hi > self.schedule.steps {
                return Err(bad(format!(
                    "denoiser {name}: trained_t {lo}..={hi} must lie in 1..={}",
                    self.schedule.steps
                )));
            }
        }
        Ok(())
    }

    /// The classifier entry of `role`: `[classifier]`, or for [`ClassifierRole::Defended`]
    /// its files replaced by `[defended_classifier]`'s where there is one.
    pub fn classifier_entry(&self, role: ClassifierRole) -> ClassifierEntry {
        let mut e = self.classifier.clone();
        if let (ClassifierRole::Defended, Some(d)) = (role, &self.defended_classifier) {
            e.file = d.file.clone();
            e.int8_file = d.int8_file.clone();
        }
        e
    }

    /// True where the defended pipeline uses another classifier file than the undefended mode.
    pub fn has_defended_classifier(&self) -> bool {
        self.defended_classifier.is_some()
    }

    /// The folder the manifest was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file this manifest was read from.
    pub fn file(&self) -> PathBuf {
        Self::path_in(&self.dir)
    }

    /// Absolute path of a file named in the manifest.
    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The file of a model at `precision`: `file` for f32, `int8_file` for int8 (an error naming
    /// the model when the manifest has no int8 version of it).
    pub fn file_at(
        &self,
        what: &str,
        file: &str,
        int8_file: Option<&str>,
        precision: crate::config::Precision,
    ) -> Result<PathBuf> {
        match precision {
            crate::config::Precision::F32 => Ok(self.path_of(file)),
            crate::config::Precision::Int8 => int8_file.map(|f| self.path_of(f)).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "precision int8: the manifest has no int8_file for the {what}"
                ))
            }),
        }
    }

    /// The model files a run of `config` uses, by role (`classifier`, `defended_classifier`
    /// where the manifest has one, `denoiser`), at its precision: what its results depend on.
    pub fn files_of(
        &self,
        config: &crate::config::DefenseConfig,
    ) -> Result<Vec<(String, PathBuf)>> {
        let c = &self.classifier;
        let d = self.denoiser(&config.denoiser)?;
        let what = format!("denoiser {}", config.denoiser);
        let precision = config.precision;
        let mut files = vec![
            (
                "classifier".into(),
                self.file_at("classifier", &c.file, c.int8_file.as_deref(), precision)?,
            ),
            ("denoiser".into(), self.file_at(&what, &d.file, d.int8_file.as_deref(), precision)?),
        ];
        if let Some(dc) = &self.defended_classifier {
            let path =
                self.file_at("defended classifier", &dc.file, dc.int8_file.as_deref(), precision)?;
            files.insert(1, ("defended_classifier".into(), path));
        }
        Ok(files)
    }

    /// The diffusion schedule (f64).
    pub fn schedule(&self) -> Result<Schedule> {
        Schedule::linear(self.schedule.steps, self.schedule.beta_start, self.schedule.beta_end)
    }

    /// The denoiser entry of a tier, or an error listing the known tiers.
    pub fn denoiser(&self, name: &str) -> Result<&DenoiserEntry> {
        self.denoisers.get(name).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "unknown denoiser {name:?}; the manifest has {:?}",
                self.denoisers.keys().collect::<Vec<_>>()
            ))
        })
    }
}
