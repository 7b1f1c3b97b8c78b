//! With the `twin` feature, generates the differentiable twins of the shipped networks from the
//! ONNX files in models/ (burn code plus embedded weights), and records a fingerprint of each
//! file so that the runtime can refuse a twin that no longer matches the model it attacks.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "twin")]
    twin::generate();
}

#[cfg(feature = "twin")]
mod twin {
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

    /// FNV-1a, 64 bit: the same function the runtime applies to the file it loads.
    fn fnv1a64(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }
}
