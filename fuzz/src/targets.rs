//! The fuzz targets' bodies: every input reader of diffshield fed arbitrary bytes. Each must
//! return (an `Ok` or a named `Err`), never panic, abort or hang. libFuzzer drives them
//! (fuzz/fuzz_targets/, `cargo fuzz`); tests/fuzz_corpus.rs replays the corpus and every saved
//! crash through the same functions on the stable toolchain in CI.

use std::io::Cursor;
use std::path::PathBuf;

/// A file of this process for `what` holding `data` (the readers take paths, as the CLI does).
fn scratch_file(what: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffshield-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(what);
    std::fs::write(&p, data).expect("the scratch folder is writable");
    p
}

/// Image decoding and fitting to the input size (PNG, JPEG, PPM/PGM, by content).
pub fn image(data: &[u8]) {
    let p = scratch_file("img", data);
    if let Ok(img) = diffshield::data::image::load_image(&p, (32, 32)) {
        assert_eq!(img.dim(), (3, 32, 32));
        assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

/// The CIFAR-10 reader, whole and streamed.
pub fn cifar(data: &[u8]) {
    use diffshield::stream::FrameSource;
    let p = scratch_file("c.bin", data);
    let whole = diffshield::data::cifar::read_cifar_bin(&p, None);
    if let Ok(src) = diffshield::stream::CifarSource::open(&p) {
        let mut src: Box<dyn FrameSource> = Box::new(src);
        let mut n = 0;
        while let Ok(Some(_)) = src.next_frame() {
            n += 1;
        }
        if let Ok(set) = whole {
            assert_eq!(set.len(), n);
        }
    }
}

/// Raw RGB8 frames: the first two bytes pick the frame size (1..=64 x 1..=64), the rest is the
/// stream.
pub fn raw_frames(data: &[u8]) {
    use diffshield::stream::FrameSource;
    let [w, h, rest @ ..] = data else { return };
    let (w, h) = (u32::from(*w % 64) + 1, u32::from(*h % 64) + 1);
    let Ok(mut src) = diffshield::stream::RawSource::new(Cursor::new(rest.to_vec()), "fuzz", w, h)
    else {
        return;
    };
    let mut frames = 0;
    while let Ok(Some((_, img, _))) = src.next_frame() {
        assert_eq!(img.dim(), (3, 32, 32));
        frames += 1;
    }
    assert_eq!(frames, rest.len() / (w * h * 3) as usize);
}

/// A defence configuration (TOML) and everything derived from it without models.
pub fn config(data: &[u8]) {
    let p = scratch_file("c.toml", data);
    if let Ok(c) = diffshield::DefenseConfig::from_file(&p) {
        if c.validate().is_ok() {
            let _ = c.plan_spec();
            let _ = c.budget(14);
        }
    }
}

/// models.toml: parsing, its checks, and the plans its schedule and ranges allow.
pub fn manifest(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("diffshield-fuzz-m-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    std::fs::write(dir.join("models.toml"), data).expect("the scratch folder is writable");
    if let Ok(m) = diffshield::manifest::Manifest::load(&dir) {
        if let (Ok(schedule), Some(d)) = (m.schedule(), m.denoisers.values().next()) {
            let spec = diffshield::PlanSpec::Stride(10);
            let _ = diffshield::DdimPlan::new(&schedule, d.trained_range(), 140, &spec, 1.0);
        }
    }
}

/// The attack report reader `--resume` uses, and what resume does with a report.
pub fn attack_report(data: &[u8]) {
    let p = scratch_file("r.json", data);
    if let Ok(mut r) = diffshield::attack::report::AttackReport::read(&p) {
        let _ = r.resumable_with(&r.clone());
        r.summarise(r.harness.runs);
        let _ = r.sanity_checks();
        let _ = r.to_json();
    }
}

/// A fuzz target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 6] = [
    ("image", image),
    ("cifar", cifar),
    ("raw_frames", raw_frames),
    ("config", config),
    ("manifest", manifest),
    ("attack_report", attack_report),
];
