//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod svg;

/// A temporary folder, removed when dropped.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty temporary folder for test `name` of this process.
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("diffshield-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// `dir/name`: a CIFAR-10 file of `n` synthetic records (labels 0..9 in turn; `salt` varies the
/// pixels).
pub fn synthetic_cifar(dir: &std::path::Path, name: &str, n: usize, salt: usize) -> PathBuf {
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.push((i % 10) as u8);
        bytes.extend((0..3072).map(|k| ((k * 7 + i * 31 + salt * 13) % 256) as u8));
    }
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The project's shipped models folder.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// `dir/name`: a models folder whose manifest is the shipped one passed through `edit`, with
/// links to the shipped ONNX files (replace one to test a broken model).
pub fn models_copy(dir: &std::path::Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let manifest = std::fs::read_to_string(models_dir().join("models.toml")).unwrap();
    std::fs::write(d.join("models.toml"), edit(manifest)).unwrap();
    for f in std::fs::read_dir(models_dir()).unwrap().filter_map(|e| e.ok()) {
        if f.path().extension().is_some_and(|e| e == "onnx") {
            std::os::unix::fs::symlink(f.path(), d.join(f.file_name())).unwrap();
        }
    }
    d
}

/// `../shared/data/NAME`. The tests that call this carry
/// `#[cfg_attr(not(shared_data), ignore = "...")]`: build.rs sets `shared_data` when the data
/// set is present, so where it is absent they are reported as ignored, with the reason. A file
/// that vanished after the build fails the test rather than passing it.
pub fn shared_data(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(name);
    assert!(
        p.is_file(),
        "{} is absent although it was there when the tests were built; touch build.rs",
        p.display()
    );
    p
}

/// Reads a `.npy` file of the golden vectors (the library's reader).
pub fn read_npy(path: &std::path::Path) -> diffshield::data::npy::Npy {
    diffshield::data::npy::read_npy(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> f64 {
    a.into_iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
