//! Integration tests of `diffshield::data`: CIFAR-10 binary reading, image loading (formats,
//! resize + centre crop, corrupt input), folder listing, PNG export and the shipped samples.

mod common;

use diffshield::data::{collect_image_paths, is_cifar_bin, load_image, read_cifar_bin, save_png};
use diffshield::Error;
use ndarray::{Array3, Axis};
use std::path::{Path, PathBuf};

/// Class names in label order (models/MODEL_CARD.md).
const CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// A fresh, empty folder unique to this test (and process).
fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffshield-data-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Deterministic pseudo-random bytes (xorshift), no extra crates.
fn pseudo_random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// A CHW image whose every value is an exact byte / 255.
fn byte_image(h: usize, w: usize, seed: u64) -> Array3<f32> {
    let bytes = pseudo_random_bytes(3 * h * w, seed);
    Array3::from_shape_vec((3, h, w), bytes.iter().map(|&b| f32::from(b) / 255.0).collect())
        .unwrap()
}

/// Asserts `r` is an error whose Display contains every one of `needles`; returns the message.
fn assert_err_mentions<T: std::fmt::Debug>(r: diffshield::Result<T>, needles: &[&str]) -> String {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    eprintln!("expected error: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    msg
}

fn assert_not_found<T: std::fmt::Debug>(r: diffshield::Result<T>, path: &Path) {
    match r {
        Err(Error::Io { path: p, source }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            assert_eq!(p, path);
        }
        other => panic!("expected Error::Io NotFound, got {other:?}"),
    }
}

// ---------------------------------------------------------------- PNG export / load round trip

#[test]
fn png_round_trip_is_exact() {
    let dir = temp_dir("png_round_trip");
    for (h, w, seed) in [(32, 32, 1u64), (20, 30, 2), (1, 1, 3)] {
        let img = byte_image(h, w, seed);
        let p = dir.join(format!("img_{h}x{w}.png"));
        save_png(&p, img.view()).unwrap();
        let back = load_image(&p, (h, w)).unwrap();
        assert_eq!(back.dim(), (3, h, w));
        assert_eq!(back, img, "{h}x{w} round trip changed pixels");
    }
    // Overwrite in place, and no temporary files are left behind.
    let p = dir.join("img_32x32.png");
    let other = byte_image(32, 32, 99);
    save_png(&p, other.view()).unwrap();
    assert_eq!(load_image(&p, (32, 32)).unwrap(), other);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "leftover files: {names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "leftover temp files: {names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn save_png_rounds_and_clamps() {
    let dir = temp_dir("png_rounding");
    let p = dir.join("r.png");
    let mut img = Array3::<f32>::zeros((3, 1, 4));
    // 0.5*255 = 127.5 -> 128; 1.2 clamps to 255; -0.3 clamps to 0; 10.4/255 -> 10.
    img.index_axis_mut(Axis(0), 0).assign(&ndarray::arr2(&[[0.5, 1.2, -0.3, 10.4 / 255.0]]));
    save_png(&p, img.view()).unwrap();
    let back = load_image(&p, (1, 4)).unwrap();
    let r: Vec<u8> =
        back.index_axis(Axis(0), 0).iter().map(|v| (v * 255.0).round() as u8).collect();
    assert_eq!(r, vec![128, 255, 0, 10]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn save_png_rejects_bad_arrays() {
    let dir = temp_dir("png_reject");
    let p = dir.join("bad.png");
    assert_err_mentions(
        save_png(&p, Array3::<f32>::zeros((1, 4, 4)).view()),
        &["shape", "[1, 4, 4]"],
    );
    assert_err_mentions(save_png(&p, Array3::<f32>::zeros((3, 0, 4)).view()), &["shape"]);
    let mut nan = Array3::<f32>::zeros((3, 2, 2));
    nan[[1, 1, 0]] = f32::NAN;
    assert_err_mentions(save_png(&p, nan.view()), &["non-finite", "(1,1,0)"]);
    assert!(!p.exists());
    // A folder that does not exist: an I/O error, nothing written.
    let missing = dir.join("no/such/folder/x.png");
    assert!(matches!(save_png(&missing, byte_image(2, 2, 5).view()), Err(Error::Io { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- other formats

#[test]
fn loads_ppm_and_pgm() {
    let dir = temp_dir("pnm");
    // 2x2 binary PPM (P6), named .dat so the format must come from the content.
    let rgb: [u8; 12] = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30];
    let mut ppm = b"P6\n2 2\n255\n".to_vec();
    ppm.extend_from_slice(&rgb);
    let p = dir.join("rgb.dat");
    std::fs::write(&p, &ppm).unwrap();
    let img = load_image(&p, (2, 2)).unwrap();
    for (i, px) in rgb.chunks(3).enumerate() {
        let (y, x) = (i / 2, i % 2);
        for c in 0..3 {
            assert_eq!(img[[c, y, x]], f32::from(px[c]) / 255.0);
        }
    }
    // Grey PGM (P5): the grey value is replicated over R, G, B.
    let mut pgm = b"P5\n2 1\n255\n".to_vec();
    pgm.extend_from_slice(&[7, 200]);
    let p = dir.join("grey.pgm");
    std::fs::write(&p, &pgm).unwrap();
    let img = load_image(&p, (1, 2)).unwrap();
    for c in 0..3 {
        assert_eq!(img[[c, 0, 0]], 7.0 / 255.0);
        assert_eq!(img[[c, 0, 1]], 200.0 / 255.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- resize + centre crop

/// A `w` x `h` PNG, left half pure red, right half pure blue.
fn write_red_blue(path: &Path, w: usize, h: usize) {
    let mut img = Array3::<f32>::zeros((3, h, w));
    for y in 0..h {
        for x in 0..w {
            img[[if x < w / 2 { 0 } else { 2 }, y, x]] = 1.0;
        }
    }
    save_png(path, img.view()).unwrap();
}

#[test]
fn downscale_centre_crop_keeps_boundary_in_middle() {
    let dir = temp_dir("resize");
    let p = dir.join("red_blue_64x48.png");
    write_red_blue(&p, 64, 48);
    let img = load_image(&p, (32, 32)).unwrap();
    assert_eq!(img.dim(), (3, 32, 32));
    // Shorter side 48 -> 32 (factor 2/3): width 64 -> 43, crop columns 5..37. The colour
    // boundary (at x = 32 of 64) lands at 21.5 - 5 = 16.5: columns 0..=15 red, 17..=31 blue,
    // column 16 a blend.
    for y in 0..32 {
        for x in 0..32 {
            let (r, g, b) = (img[[0, y, x]], img[[1, y, x]], img[[2, y, x]]);
            assert_eq!(g, 0.0, "green appeared at ({y},{x})");
            assert!((r + b - 1.0).abs() <= 1.5 / 255.0, "not a red/blue blend at ({y},{x})");
            if x <= 15 {
                assert!(r > 0.9, "({y},{x}) should be red: r={r} b={b}");
            } else if x >= 17 {
                assert!(b > 0.9, "({y},{x}) should be blue: r={r} b={b}");
            } else {
                assert!(r > 0.2 && b > 0.2, "column 16 should be a blend: r={r} b={b}");
            }
            // Every row is the same (vertical scaling of a vertically constant image).
            assert_eq!(img[[0, y, x]], img[[0, 0, x]]);
        }
    }
    // Red and blue areas are mirror images of each other around the boundary.
    let reds: f32 = img.index_axis(Axis(0), 0).sum();
    let blues: f32 = img.index_axis(Axis(0), 2).sum();
    assert!((reds - blues).abs() <= 32.0 * 1.01, "red {reds} vs blue {blues}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resize_covers_non_square_targets_and_upscales() {
    let dir = temp_dir("resize_shapes");
    let p = dir.join("red_blue_64x48.png");
    write_red_blue(&p, 64, 48);
    // Wide target 16x32 (h x w): width binds (64 -> 32), height 48 -> 24, crop rows 4..20.
    let img = load_image(&p, (16, 32)).unwrap();
    assert_eq!(img.dim(), (3, 16, 32));
    assert!(img[[0, 8, 0]] > 0.9 && img[[2, 8, 31]] > 0.9);
    // Upscaling a 4x4 to 8x8: bilinear, values stay within the source range.
    let q = dir.join("small.png");
    let small = byte_image(4, 4, 7);
    save_png(&q, small.view()).unwrap();
    let big = load_image(&q, (8, 8)).unwrap();
    assert_eq!(big.dim(), (3, 8, 8));
    assert!(big.iter().all(|v| (0.0..=1.0).contains(v)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_target_size_is_an_error() {
    let dir = temp_dir("zero_target");
    let p = dir.join("a.png");
    save_png(&p, byte_image(4, 4, 1).view()).unwrap();
    assert_err_mentions(load_image(&p, (0, 32)), &["non-zero"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- bad image files

#[test]
fn bad_image_files_are_errors_not_panics() {
    let dir = temp_dir("bad_images");

    // Truncated PNG.
    let good = dir.join("good.png");
    save_png(&good, byte_image(32, 32, 11).view()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let trunc = dir.join("truncated.png");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let msg = assert_err_mentions(
        load_image(&trunc, (32, 32)),
        &["cannot decode image", "truncated.png"],
    );
    assert!(msg.contains("corrupt") || msg.contains("truncated"), "{msg}");

    // Random garbage named .png.
    let garbage = dir.join("garbage.png");
    std::fs::write(&garbage, pseudo_random_bytes(5000, 42)).unwrap();
    assert_err_mentions(load_image(&garbage, (32, 32)), &["cannot decode image", "garbage.png"]);

    // Zero-byte .jpg.
    let empty = dir.join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    assert_err_mentions(load_image(&empty, (32, 32)), &["cannot decode image", "empty file"]);

    // Text named .jpg: no image signature.
    let text = dir.join("notes.txt");
    std::fs::write(&text, b"just some text, not an image at all").unwrap();
    assert_err_mentions(load_image(&text, (32, 32)), &["unrecognised image format"]);

    // A folder given as an image.
    assert_err_mentions(load_image(&dir, (32, 32)), &["not a regular file"]);

    // Missing file.
    let missing = dir.join("missing.png");
    assert_not_found(load_image(&missing, (32, 32)), &missing);

    // Every prefix length of a PNG and of a JPEG, and corrupted copies: Ok or Err, never a panic.
    let jpg = crate_root().join("samples/other/cat_upscaled.jpg");
    let mut sources = vec![bytes.clone()];
    if let Ok(j) = std::fs::read(&jpg) {
        sources.push(j);
    }
    let cut = dir.join("cut.img");
    for (k, src) in sources.iter().enumerate() {
        for len in (0..src.len()).step_by(37) {
            std::fs::write(&cut, &src[..len]).unwrap();
            let _ = load_image(&cut, (32, 32));
        }
        for seed in 1..20u64 {
            let mut corrupt = src.clone();
            for (i, b) in pseudo_random_bytes(8, seed * 31 + k as u64).chunks(2).enumerate() {
                let pos = (usize::from(b[0]) * 7 + i * 131 + seed as usize * 17) % corrupt.len();
                corrupt[pos] ^= b[1] | 1;
            }
            std::fs::write(&cut, &corrupt).unwrap();
            if let Ok(img) = load_image(&cut, (32, 32)) {
                assert_eq!(img.dim(), (3, 32, 32));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_size_pnm_is_an_error() {
    let dir = temp_dir("zero_size");
    let p = dir.join("zero.ppm");
    std::fs::write(&p, b"P6\n0 0\n255\n").unwrap();
    assert_err_mentions(
        load_image(&p, (32, 32)),
        &["cannot decode image", "zero.ppm", "zero-size"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- folder listing

#[test]
fn collect_image_paths_lists_folders_and_keeps_files() {
    let dir = temp_dir("collect");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(imgs.join("sub")).unwrap();
    for name in
        ["b.PNG", "a.jpg", "c.JpEg", "d.ppm", "e.pgm", "f.pnm", "notes.txt", "g.bin", ".hidden.png"]
    {
        std::fs::write(imgs.join(name), b"x").unwrap();
    }
    std::fs::write(imgs.join("sub/z.png"), b"x").unwrap();
    let single = dir.join("whatever.dat");
    std::fs::write(&single, b"x").unwrap();

    let got = collect_image_paths(&[single.clone(), imgs.clone()]).unwrap();
    let names: Vec<String> =
        got.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["whatever.dat", "a.jpg", "b.PNG", "c.JpEg", "d.ppm", "e.pgm", "f.pnm"]);
    assert_eq!(got[1], imgs.join("a.jpg"));

    // Empty of images: the error names the folder.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("readme.txt"), b"x").unwrap();
    assert_err_mentions(
        collect_image_paths(&[imgs.clone(), empty.clone()]),
        &["no PNG/JPEG/PPM images in this folder", ".jpeg", &empty.display().to_string()],
    );
    let e = collect_image_paths(std::slice::from_ref(&empty)).unwrap_err();
    assert!(!e.to_string().contains("decode"), "nothing was decoded: {e}");

    // Missing path.
    let missing = dir.join("nope");
    assert_not_found(collect_image_paths(&[imgs, missing.clone()]), &missing);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- CIFAR-10 binary

/// One CIFAR record: R plane = r, G plane = g, B plane = b, except pixel (y=1, x=2) which is
/// r+1, g+1, b+1 in the three planes.
fn record(label: u8, r: u8, g: u8, b: u8) -> Vec<u8> {
    let mut rec = vec![label];
    for v in [r, g, b] {
        let mut plane = vec![v; 1024];
        plane[32 + 2] = v + 1;
        rec.extend(plane);
    }
    rec
}

#[test]
fn cifar_reads_labels_and_plane_order() {
    let dir = temp_dir("cifar_ok");
    let p = dir.join("two.bin");
    let mut bytes = record(3, 10, 20, 30);
    bytes.extend(record(9, 100, 150, 200));
    std::fs::write(&p, &bytes).unwrap();
    assert!(
        is_cifar_bin(&p) && is_cifar_bin(Path::new("x.BIN")) && !is_cifar_bin(Path::new("x.png"))
    );

    let set = read_cifar_bin(&p, None).unwrap();
    assert_eq!(set.labels, vec![3, 9]);
    assert_eq!(set.images.dim(), (2, 3, 32, 32));
    for (n, base) in [(0, [10u8, 20, 30]), (1, [100, 150, 200])] {
        for (c, &v) in base.iter().enumerate() {
            let want = f32::from(v) / 255.0;
            assert_eq!(set.images[[n, c, 0, 0]], want, "image {n} channel {c}");
            assert_eq!(set.images[[n, c, 31, 31]], want);
            assert_eq!(
                set.images[[n, c, 2, 1]],
                want,
                "row-major: (y=2,x=1) is not the marked pixel"
            );
            assert_eq!(
                set.images[[n, c, 1, 2]],
                f32::from(v + 1) / 255.0,
                "marked pixel (y=1,x=2)"
            );
        }
    }

    // Limits: fewer records, or all of them where the file has fewer.
    let one = read_cifar_bin(&p, Some(1)).unwrap();
    assert_eq!(one.labels, vec![3]);
    assert_eq!(one.images.dim(), (1, 3, 32, 32));
    assert_eq!(one.images.index_axis(Axis(0), 0), set.images.index_axis(Axis(0), 0));
    assert_eq!(read_cifar_bin(&p, Some(5)).unwrap(), set);
    assert!(read_cifar_bin(&p, Some(0)).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cifar_bad_files_are_errors() {
    let dir = temp_dir("cifar_bad");

    let wrong = dir.join("wrong.bin");
    let mut bytes = record(1, 1, 2, 3);
    bytes.extend_from_slice(&[0; 5]);
    std::fs::write(&wrong, &bytes).unwrap();
    for limit in [None, Some(1)] {
        assert_err_mentions(
            read_cifar_bin(&wrong, limit),
            &["CIFAR-10 file", "wrong.bin", "3078", "3073"],
        );
    }

    let empty = dir.join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    assert_err_mentions(read_cifar_bin(&empty, None), &["empty"]);

    let bad = dir.join("badlabel.bin");
    let mut bytes = record(0, 1, 2, 3);
    bytes.extend(record(10, 1, 2, 3));
    std::fs::write(&bad, &bytes).unwrap();
    assert_err_mentions(read_cifar_bin(&bad, None), &["record 1", "label 10"]);
    // The bad record is not read under a limit that stops before it.
    assert_eq!(read_cifar_bin(&bad, Some(1)).unwrap().labels, vec![0]);

    let missing = dir.join("missing.bin");
    assert_not_found(read_cifar_bin(&missing, None), &missing);
    assert_not_found(read_cifar_bin(&missing, Some(3)), &missing);

    assert_err_mentions(read_cifar_bin(&dir, None), &["not a regular file"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- shipped samples

/// The `samples/NN_<class>.png` files, sorted.
fn sample_pngs() -> Vec<PathBuf> {
    let paths = collect_image_paths(&[crate_root().join("samples")]).unwrap();
    assert!(paths.iter().all(|p| p.extension().unwrap() == "png"));
    paths
}

#[test]
fn samples_are_twenty_32x32_pngs() {
    let paths = sample_pngs();
    assert_eq!(paths.len(), 20);
    for (i, p) in paths.iter().enumerate() {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        let (nn, class) = name.split_once('_').unwrap();
        assert_eq!(nn, format!("{i:02}"));
        assert!(CLASSES.contains(&class), "{name}: unknown class");
        let img = load_image(p, (32, 32)).unwrap();
        assert_eq!(img.dim(), (3, 32, 32));
    }
    // The non-square JPEG sample is resized and cropped to any target.
    let jpg = crate_root().join("samples/other/cat_upscaled.jpg");
    for size in [(32, 32), (72, 96), (24, 40)] {
        let img = load_image(&jpg, size).unwrap();
        assert_eq!(img.dim(), (3, size.0, size.1));
        assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

#[cfg_attr(not(shared_data), ignore = "needs ../shared/data (absent at build time)")]
#[test]
fn samples_match_shared_cifar_records() {
    let bin = common::shared_data("cifar10_test_2000.bin");
    let set = read_cifar_bin(&bin, Some(20)).unwrap();
    let paths = sample_pngs();
    assert_eq!(paths.len(), 20);
    for (i, p) in paths.iter().enumerate() {
        let img = load_image(p, (32, 32)).unwrap();
        assert_eq!(
            img.view(),
            set.images.index_axis(Axis(0), i),
            "{} differs from record {i}",
            p.display()
        );
        let class = CLASSES[usize::from(set.labels[i])];
        assert!(
            p.file_name().unwrap().to_string_lossy().ends_with(&format!("_{class}.png")),
            "{}: record {i} is a {class}",
            p.display()
        );
    }
}
