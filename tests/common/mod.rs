//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod svg;

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

/// A little-endian .npy array: shape and values as f64.
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Reads the .npy files numpy writes for f32 / f64 / i64 C-order arrays.
pub fn read_npy(path: &std::path::Path) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an npy file");
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12)
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{header}");
    let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap();
    let shape_txt = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let body = &bytes[start + hlen..];
    let data: Vec<f64> = match descr {
        "<f4" => {
            body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        "<f8" => body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        "<i8" => {
            body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        other => panic!("unsupported dtype {other}"),
    };
    assert_eq!(data.len(), shape.iter().product::<usize>());
    Npy { shape, data }
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> f64 {
    a.into_iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
