//! With the `twin` feature, generates the differentiable twins of the shipped networks from the
//! ONNX files in models/ (burn code plus embedded weights), and records a fingerprint of each
//! file so that the runtime can refuse a twin that no longer matches the model it attacks.
//!
//! It also sets `cfg(shared_data)` when the shared CIFAR-10 test set
//! (`../shared/data/cifar10_test_2000.bin`, not part of a clone) is present, so that the tests
//! needing it are marked ignored, with the reason, where it is not: counted and named in
//! `cargo test`'s output instead of passing silently.

/// The shared data file the data-dependent tests read, relative to the package.
const SHARED_DATA: &str = "../shared/data/cifar10_test_2000.bin";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/fingerprint.rs");
    println!("cargo:rustc-check-cfg=cfg(shared_data)");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let shared = std::path::Path::new(&manifest_dir).join(SHARED_DATA);
    if shared.is_file() {
        println!("cargo:rustc-cfg=shared_data");
        // Rerun (and stop claiming the data) if it goes away. A path that does not exist would
        // make cargo rerun this script on every build, so an absent file is not watched: after
        // adding ../shared, `touch build.rs`.
        println!("cargo:rerun-if-changed={}", shared.display());
    }
    record_commit(std::path::Path::new(&manifest_dir));
    #[cfg(feature = "twin")]
    twin::generate();
}

/// Sets `DIFFSHIELD_COMMIT` (attack reports quote it) from git, when the package is a git
/// checkout and git runs; the reports say `unknown` otherwise. Watches HEAD and the branch it
/// points to, so a new commit rebuilds.
fn record_commit(dir: &std::path::Path) {
    let git = dir.join(".git");
    if !git.is_dir() {
        return;
    }
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            let branch = git.join(r);
            if branch.is_file() {
                println!("cargo:rerun-if-changed={}", branch.display());
            }
        }
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(dir)
        .output();
    if let Some(out) = out.ok().filter(|o| o.status.success()) {
        let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !commit.is_empty() {
            println!("cargo:rustc-env=DIFFSHIELD_COMMIT={commit}");
        }
    }
}

/// The same hash the runtime applies to the model file it loads.
#[cfg(feature = "twin")]
#[path = "src/fingerprint.rs"]
mod fingerprint;

#[cfg(feature = "twin")]
mod twin {
    use super::fingerprint::fnv1a64;
    use std::fmt::Write as _;
    use std::path::PathBuf;

    /// The networks that get a twin, as named in models/models.toml.
    const MODELS: [&str; 3] = ["classifier", "denoiser_s", "denoiser_m"];

    pub fn generate() {
        let models = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
            .join("models");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
        let mut fingerprints = String::new();
        for name in MODELS {
            let onnx = models.join(format!("{name}.onnx"));
            println!("cargo:rerun-if-changed={}", onnx.display());
            let bytes = std::fs::read(&onnx)
                .unwrap_or_else(|e| panic!("twin: cannot read {}: {e}", onnx.display()));
            let _ = writeln!(
                fingerprints,
                "pub const {}: u64 = {:#018x};",
                name.to_uppercase(),
                fnv1a64(&bytes)
            );
            burn_onnx::ModelGen::new()
                .input(onnx.to_str().expect("models path is UTF-8"))
                .out_dir("twin/")
                .load_strategy(burn_onnx::LoadStrategy::Embedded)
                .run_from_script();
        }
        std::fs::write(out.join("twin/fingerprints.rs"), fingerprints)
            .expect("twin: writing fingerprints");
    }
}
