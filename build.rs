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
            // `Bytes`: the generated code embeds no weights; the runtime rebuilds the burnpack
            // from the deployed ONNX file (src/grad/twin_weights.rs) with the table below.
            burn_onnx::ModelGen::new()
                .input(onnx.to_str().expect("models path is UTF-8"))
                .out_dir("twin/")
                .load_strategy(burn_onnx::LoadStrategy::Bytes)
                .run_from_script();
            super::twin_weights::split(name, &bytes, &out.join("twin"));
        }
        std::fs::write(out.join("twin/fingerprints.rs"), fingerprints)
            .expect("twin: writing fingerprints");
    }
}

/// Splits the burnpack burn-onnx wrote into tensors the ONNX file holds verbatim (or as the
/// transpose of a 2-D initializer: a MatMul weight becomes a Linear's) and the rest, which
/// burn-onnx computed (folded constants). The first are recorded as a table of where to find
/// them in the ONNX file; only the rest is embedded in the binary. That keeps one copy of the
/// weights, in models/, instead of a second ~60 MB one inside every binary with twins.
#[cfg(feature = "twin")]
mod twin_weights {
    use burn_store::burn_pack::{Bytes, DType, Reader, Tensor, Writer};
    use onnx_ir::Message as _;
    use std::collections::HashMap;
    use std::fmt::Write as _;
    use std::path::Path;

    /// ONNX's `TensorProto.DataType.FLOAT`.
    const ONNX_FLOAT: i32 = 1;

    /// The little-endian bytes of every f32 tensor the ONNX graph stores, keyed by content,
    /// each naming the first initializer (or Constant node output) that holds it.
    fn onnx_tensors(onnx: &[u8]) -> HashMap<Vec<u8>, String> {
        let model = onnx_ir::ModelProto::parse_from_bytes(onnx).expect("twin: parsing ONNX");
        let graph = model.graph.as_ref().expect("twin: ONNX model without a graph");
        let constants = graph.node.iter().filter(|n| n.op_type == "Constant").filter_map(|n| {
            let value = n.attribute.iter().find(|a| a.name == "value")?;
            Some((n.output.first()?.clone(), value.t.as_ref()?))
        });
        let mut found = HashMap::new();
        let initializers = graph.initializer.iter().map(|t| (t.name.clone(), t));
        for (name, t) in initializers.chain(constants) {
            if t.data_type != ONNX_FLOAT {
                continue;
            }
            let bytes = if t.raw_data.is_empty() {
                t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            } else {
                t.raw_data.to_vec()
            };
            found.entry(bytes).or_insert(name);
        }
        found
    }

    fn transposed(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        let mut t = vec![0u8; bytes.len()];
        for r in 0..rows {
            for c in 0..cols {
                let (from, to) = ((r * cols + c) * 4, (c * rows + r) * 4);
                t[to..to + 4].copy_from_slice(&bytes[from..from + 4]);
            }
        }
        t
    }

    pub fn split(name: &str, onnx: &[u8], dir: &Path) {
        let bpk = dir.join(format!("{name}.bpk"));
        let tensors = Reader::from_file(&bpk)
            .and_then(Reader::into_tensors)
            .unwrap_or_else(|e| panic!("twin: reading {}: {e}", bpk.display()));
        let in_onnx = onnx_tensors(onnx);
        let mut table = String::new();
        let mut names = std::collections::HashSet::new();
        let mut rest = Vec::new();
        for t in tensors {
            let (key, dtype, shape, id, bytes) = t.into_parts().expect("twin: burnpack tensor");
            let dims = shape.to_vec();
            let source = match (dtype, dims.as_slice()) {
                (DType::F32, _) if in_onnx.contains_key(&bytes[..]) => {
                    Some((&in_onnx[&bytes[..]], false))
                }
                (DType::F32, &[rows, cols]) => {
                    in_onnx.get(&transposed(&bytes, rows, cols)).map(|n| (n, true))
                }
                _ => None,
            };
            match source {
                Some((onnx_name, transpose)) => {
                    names.insert(onnx_name.clone());
                    let _ = writeln!(
                        table,
                        "    FromOnnx {{ key: {key:?}, onnx: {onnx_name:?}, shape: &{dims:?}, \
                         transpose: {transpose} }},"
                    );
                }
                None => rest.push(Tensor::new(key, dtype, shape, id, bytes)),
            }
        }
        let rest_tensors = rest.len();
        let rest_bytes: Bytes = Writer::new(rest).into_bytes().expect("twin: writing rest");
        let rest_path = dir.join(format!("{name}.rest.bpk"));
        std::fs::write(&rest_path, &rest_bytes[..]).expect("twin: writing rest");
        // The full burnpack is not needed any more (nothing includes it): keep target/ small.
        let _ = std::fs::remove_file(&bpk);
        let structure = super::fingerprint::onnx_structure(onnx, &|n| names.contains(n))
            .expect("twin: ONNX file is not a protobuf message");
        let code = format!(
            "/// Where each of the twin's tensors lies in the ONNX file it was generated from.\n\
             pub const FROM_ONNX: &[FromOnnx] = &[\n{table}];\n\
             /// The tensors burn-onnx computed itself, as a burnpack ({} bytes).\n\
             pub static REST: &[u8] = include_bytes!({:?});\n\
             /// How many tensors REST holds.\n\
             pub const REST_TENSORS: usize = {rest_tensors};\n\
             /// `onnx_structure` of the file, its FROM_ONNX tensors' values left out.\n\
             pub const STRUCTURE: u64 = {structure:#018x};\n",
            rest_bytes.len(),
            rest_path.display().to_string()
        );
        std::fs::write(dir.join(format!("{name}_weights.rs")), code)
            .expect("twin: writing weight table");
    }
}
