//! A purified copy of a training set, to fine-tune a classifier on what the defended pipeline
//! shows it: every image purified `draws` times with the deployed plan and denoiser, each draw
//! with its own noise ([`NoiseDomain::TrainingSet`], vote = draw), so a classifier trained on it
//! cannot learn one noise pattern. Only clean images go in: no adversarial examples, so the
//! defence stays threat-model agnostic.
//!
//! The output folder holds `manifest.json` (what was run: source and model digests, plan, seed)
//! and shards `shard_NNNNN.bin` of CIFAR-10 records (label byte, then the purified image rounded
//! to bytes), image-major: image i of the shard, draw 0..draws. A shard is written whole or not
//! at all, so a killed run resumes at the first missing shard with the manifest's seed and gives
//! the same bytes it would have given uninterrupted; a folder made with other settings is
//! refused rather than mixed.

use crate::config::{DefenseConfig, Precision};
use crate::data::{CifarSet, CIFAR_IMAGE_BYTES, CIFAR_RECORD_BYTES};
use crate::error::{Error, Result};
use crate::files::{write_atomically, OutputLock};
use crate::noise::NoiseDomain;
use crate::pipeline::Pipeline;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The format tag of `manifest.json`.
pub const FORMAT: &str = "diffshield-purified-set/1";

/// What a purified set was made from and how: a resumed run must agree on every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurifiedSetManifest {
    /// [`FORMAT`].
    pub format: String,
    /// File name of the source set (a CIFAR-10 .bin or a JPEG pack).
    pub source: String,
    /// `sha256:` digest of the source file.
    pub source_sha256: String,
    /// Images taken from the source (its first ones).
    pub images: usize,
    /// Purifications per image, each with its own noise.
    pub draws: u32,
    /// Images per shard (the last shard may hold fewer).
    pub shard_images: usize,
    /// Denoiser tier (models/models.toml).
    pub denoiser: String,
    /// `sha256:` digest of the denoiser file that ran.
    pub denoiser_sha256: String,
    /// The models' precision (`f32` or `int8`).
    pub precision: Precision,
    /// The DDIM plan's timesteps, T* first.
    pub timesteps: Vec<u32>,
    /// DDIM eta.
    pub eta: f64,
    /// The noise seed (drawn from the OS on the first run unless given).
    pub seed: u64,
}

impl PurifiedSetManifest {
    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.images.div_ceil(self.shard_images)
    }

    /// Images in shard `k`.
    pub fn shard_len(&self, k: usize) -> usize {
        self.shard_images.min(self.images - k * self.shard_images)
    }
}

/// How to make a purified set.
#[derive(Debug, Clone)]
pub struct PurifiedSetSpec {
    /// The source set: a CIFAR-10 `.bin` or a JPEG `.pack` (split 0, the training split).
    pub source: PathBuf,
    /// Use only its first N images.
    pub limit: Option<usize>,
    /// The output folder (created; an existing one is resumed if its manifest agrees).
    pub out: PathBuf,
    /// Purifications per image, 1..=64.
    pub draws: u32,
    /// Images per shard, at least 1: the work a killed run can lose.
    pub shard_images: usize,
    /// The deployed defence: denoiser, plan, precision, threads, batch, seed, models. Its
    /// `votes` is replaced by `draws`.
    pub defense: DefenseConfig,
}

/// One shard done (or found done).
#[derive(Debug, Clone, Copy)]
pub struct ShardDone {
    /// Shard index, from 0.
    pub index: usize,
    /// Number of shards.
    pub of: usize,
    /// Images in it.
    pub images: usize,
    /// Wall time it took, seconds (0 where it was already there).
    pub seconds: f64,
    /// It was already complete and was kept.
    pub kept: bool,
}

fn bad(what: impl Into<String>) -> Error {
    Error::InvalidConfig(what.into())
}

/// Purifies `spec.source` into `spec.out`, resuming an earlier run of the same settings; calls
/// `progress` after every shard. Returns the manifest (with the seed that was used).
///
/// Errors: [`Error::InvalidConfig`] for bad settings, an output folder made with different ones
/// (naming the field) or being written by another run; the source's and the models' own errors.
pub fn purify_set(
    spec: &PurifiedSetSpec,
    progress: &mut dyn FnMut(&ShardDone),
) -> Result<PurifiedSetManifest> {
    if !(1..=64).contains(&spec.draws) {
        return Err(bad(format!("draws must be 1..=64, got {}", spec.draws)));
    }
    if spec.shard_images == 0 {
        return Err(bad("shard size must be at least 1 image"));
    }
    if spec.limit == Some(0) {
        return Err(bad("--limit 0 purifies no image"));
    }
    let inside_out = std::fs::canonicalize(&spec.out)
        .ok()
        .zip(std::fs::canonicalize(&spec.source).ok())
        .is_some_and(|(out, source)| source.starts_with(out));
    if inside_out {
        return Err(bad(format!(
            "the source {} is inside the output folder {}, whose files the run writes and keeps",
            spec.source.display(),
            spec.out.display()
        )));
    }
    let set = read_source(&spec.source, spec.limit)?;
    let mut config = spec.defense.clone();
    config.votes = spec.draws;
    crate::backend::resolve_precision(&mut config);
    config.validate()?;
    // Everything that can refuse these settings runs before the first file is made, so a
    // failed start leaves no folder or manifest behind (which a corrected rerun would then
    // refuse as made with other settings).
    let wanted = manifest_for(spec, &config, set.len())?;
    let manifest_path = spec.out.join("manifest.json");
    let asked_seed = config.seed;
    let mut pipeline: Option<Pipeline> = None;
    if manifest_path.exists() {
        crate::files::check_regular_file(&manifest_path)?;
    } else {
        // A fresh set: its models load now (a truncated file, a missing backend, too many
        // threads), with the seed the manifest will record.
        config.seed = Some(config.resolve_seed()?);
        pipeline = Some(Pipeline::from_config(&config)?);
    }
    std::fs::create_dir_all(&spec.out)
        .map_err(|source| Error::Io { path: spec.out.clone(), source })?;
    let _lock = OutputLock::acquire(&manifest_path)?;
    let manifest = match std::fs::read(&manifest_path) {
        Ok(bytes) => resumed(&manifest_path, &bytes, wanted, asked_seed)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut m = wanted;
            m.seed = match config.seed {
                Some(seed) => seed,
                None => config.resolve_seed()?,
            };
            let json = serde_json::to_vec_pretty(&m)
                .map_err(|e| Error::Backend(format!("manifest: {e}")))?;
            write_atomically(&manifest_path, &json)?;
            m
        }
        Err(source) => return Err(Error::Io { path: manifest_path, source }),
    };
    if config.seed != Some(manifest.seed) {
        // Another run wrote the manifest first: its seed rules, so the pipeline is rebuilt.
        pipeline = None;
    }
    config.seed = Some(manifest.seed);
    let batch = config.batch.max(1);
    for k in 0..manifest.shards() {
        let path = spec.out.join(format!("shard_{k:05}.bin"));
        let n = manifest.shard_len(k);
        let expected = (n * manifest.draws as usize * CIFAR_RECORD_BYTES) as u64;
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == expected) {
            progress(&ShardDone {
                index: k,
                of: manifest.shards(),
                images: n,
                seconds: 0.0,
                kept: true,
            });
            continue;
        }
        // Built on the first shard that needs it: a finished set resumes without loading models.
        let p = match &mut pipeline {
            Some(p) => p,
            None => pipeline.insert(Pipeline::from_config(&config)?),
        };
        let start = Instant::now();
        let first = k * manifest.shard_images;
        let mut records = Vec::with_capacity(expected as usize);
        for b in (first..first + n).step_by(batch) {
            let end = (b + batch).min(first + n);
            let images = set.images.slice(ndarray::s![b..end, .., .., ..]);
            let purified = p.purify_votes_in(images, NoiseDomain::TrainingSet, b as u64)?;
            for (j, img) in purified.outer_iter().enumerate() {
                records.push(set.labels[b + j / manifest.draws as usize]);
                let pixels = img.as_standard_layout();
                let flat = pixels.as_slice().ok_or_else(|| Error::Backend("layout".into()))?;
                debug_assert_eq!(flat.len(), CIFAR_IMAGE_BYTES);
                records.extend(flat.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8));
            }
        }
        write_atomically(&path, &records)?;
        let seconds = start.elapsed().as_secs_f64();
        progress(&ShardDone { index: k, of: manifest.shards(), images: n, seconds, kept: false });
    }
    Ok(manifest)
}

/// The source set: a JPEG pack (its training split) or a CIFAR-10 binary file.
fn read_source(path: &Path, limit: Option<usize>) -> Result<CifarSet> {
    if crate::data::pack::is_jpeg_pack(path) {
        crate::data::pack::read_jpeg_pack(path, 0, limit)
    } else {
        crate::data::read_cifar_bin(path, limit)
    }
}

/// The manifest these settings make (seed 0 until resolved).
fn manifest_for(
    spec: &PurifiedSetSpec,
    config: &DefenseConfig,
    images: usize,
) -> Result<PurifiedSetManifest> {
    let models = crate::manifest::Manifest::load(&config.models_dir()?)?;
    let entry = models.denoiser(&config.denoiser)?;
    let file = match config.precision {
        Precision::F32 => &entry.file,
        Precision::Int8 => entry.int8_file.as_ref().ok_or_else(|| {
            bad(format!("denoiser {:?} has no int8 file in the manifest", config.denoiser))
        })?,
    };
    let plan = crate::schedule::DdimPlan::new(
        &models.schedule()?,
        entry.trained_range(),
        config.t_star,
        &config.plan_spec()?,
        config.eta,
    )?;
    Ok(PurifiedSetManifest {
        format: FORMAT.into(),
        source: spec
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        source_sha256: crate::files::sha256_file(&spec.source)?,
        images,
        draws: spec.draws,
        shard_images: spec.shard_images,
        denoiser: config.denoiser.clone(),
        denoiser_sha256: crate::files::sha256_file(&models.path_of(file))?,
        precision: config.precision,
        timesteps: plan.timesteps().to_vec(),
        eta: config.eta,
        seed: 0,
    })
}

/// The manifest of an existing folder, if it was made with `wanted`'s settings and a seed the
/// caller did not contradict.
fn resumed(
    path: &Path,
    bytes: &[u8],
    wanted: PurifiedSetManifest,
    seed: Option<u64>,
) -> Result<PurifiedSetManifest> {
    let found: PurifiedSetManifest =
        serde_json::from_slice(bytes).map_err(|e| Error::ConfigFile {
            path: path.into(),
            reason: format!("not a purified set's manifest ({e})"),
        })?;
    let differs = |field: &str, had: String, now: String| {
        bad(format!(
            "{} was made with {field} {had}, this run asks for {now}; resume with the same \
             settings or use another folder",
            path.display()
        ))
    };
    macro_rules! same {
        ($($f:ident),*) => {$(
            if found.$f != wanted.$f {
                return Err(differs(stringify!($f), format!("{:?}", found.$f), format!("{:?}", wanted.$f)));
            }
        )*};
    }
    same!(format, source, source_sha256, images, draws, shard_images, denoiser, denoiser_sha256);
    same!(precision, timesteps, eta);
    if let Some(s) = seed.filter(|&s| s != found.seed) {
        return Err(differs("seed", found.seed.to_string(), s.to_string()));
    }
    Ok(found)
}

/// Reads back shard `k` of a purified set: `(labels, [n * draws, 3, 32, 32] pixels in [0,1])`.
pub fn read_shard(dir: &Path, k: usize) -> Result<CifarSet> {
    crate::data::read_cifar_bin(&dir.join(format!("shard_{k:05}.bin")), None)
}
