//! Typed errors of the library. The binary maps every variant to exit code 2 (bad input or
//! configuration) except [`Error::Backend`] and [`Error::Entropy`] (internal failures) and
//! [`Error::CheckFailed`] (a check the user asked for did not pass), which exit with 1.

use std::path::PathBuf;

/// Everything the library can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// T* is outside the range of timesteps the denoiser was trained on.
    #[error(
        "T*={t_star} is outside the denoiser's trained range {min}..={max} (models/models.toml)"
    )]
    TStarOutOfRange {
        /// The T* asked for (diffusion steps, 1..=schedule length).
        t_star: u32,
        /// The smallest T* the denoiser was trained on.
        min: u32,
        /// The largest T* the denoiser was trained on.
        max: u32,
    },
    /// A DDIM plan that cannot be built (stride 0, non-decreasing list, ...).
    #[error("invalid DDIM plan: {0}")]
    InvalidPlan(String),
    /// A configuration value that makes no sense (eta < 0, votes = 0, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A configuration file that cannot be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The model manifest (models/models.toml) is missing, unparsable or inconsistent.
    #[error("model manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An ONNX file whose inputs/outputs disagree with its manifest entry.
    #[error("model {path} does not match its manifest entry: {reason}")]
    ManifestMismatch {
        /// The ONNX file.
        path: PathBuf,
        /// Which input or output disagrees, and how.
        reason: String,
    },
    /// A model file that is missing, truncated or not loadable.
    #[error("cannot load model {path}: {reason}")]
    ModelLoad {
        /// The model file.
        path: PathBuf,
        /// Why it cannot be loaded.
        reason: String,
    },
    /// An image file that cannot be decoded.
    #[error("cannot decode image {path}: {reason}")]
    Image {
        /// The image file (or a description of an in-memory frame).
        path: PathBuf,
        /// The decoder's or the size check's message.
        reason: String,
    },
    /// A CIFAR-10 binary file whose size or content is wrong.
    #[error("CIFAR-10 file {path}: {reason}")]
    Cifar {
        /// The data file.
        path: PathBuf,
        /// What is wrong with its size or content.
        reason: String,
    },
    /// Input tensor with a wrong shape.
    #[error("bad input shape: expected {expected}, got {got}")]
    Shape {
        /// The shape wanted, e.g. `[n, 3, 32, 32]`.
        expected: String,
        /// The shape given.
        got: String,
    },
    /// Input pixels that are NaN/infinite or outside \[0,1\].
    #[error("bad pixel values in {what}: {reason}")]
    Pixels {
        /// Which input holds them.
        what: String,
        /// The first bad value and where it is.
        reason: String,
    },
    /// A requested backend that this build or machine does not have.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// An attack that this build does not have (e.g. the gradient attacks before they land).
    #[error("attack unavailable: {0}")]
    AttackUnavailable(String),
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path the operation was on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A check the user asked for failed: a `--min-acc` threshold, a gradient check.
    #[error("{0}")]
    CheckFailed(String),
    /// The operating system's entropy source failed (no seed could be drawn).
    #[error("cannot draw a noise seed from the operating system: {0}; pass a fixed seed")]
    Entropy(String),
    /// The inference engine failed on valid input (an internal fault, not the user's).
    #[error("inference backend failed: {0}")]
    Backend(String),
}

/// Library result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True where the error is the caller's input or configuration, not an internal fault.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Backend(_) | Error::Entropy(_) | Error::CheckFailed(_))
    }
}
