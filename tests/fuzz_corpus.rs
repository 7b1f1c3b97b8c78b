//! The fuzz targets (fuzz/src/targets.rs) replayed on their seed corpus (fuzz/seeds/) and on
//! every input a fuzzing run found to crash (fuzz/regressions/, kept once fixed): a smoke run
//! on the stable toolchain, so that CI catches a reader that regressed on a known input.

#[allow(dead_code)]
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

#[test]
fn every_target_survives_its_seeds_and_past_crashes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut runs = 0;
    for (name, target) in targets::TARGETS {
        for dir in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else { continue };
            for entry in entries.filter_map(|e| e.ok()) {
                let data = std::fs::read(entry.path()).unwrap();
                target(&data);
                // Cut and bit-flipped variants of each seed, as a fuzzer's first steps would be.
                for cut in [0, 1, data.len() / 2, data.len().saturating_sub(1)] {
                    target(&data[..cut.min(data.len())]);
                }
                let mut flipped = data.clone();
                for i in (0..flipped.len()).step_by(97) {
                    flipped[i] ^= 0x5a;
                }
                target(&flipped);
                runs += 6;
            }
        }
    }
    assert!(runs >= 6 * 15, "the seed corpus went missing ({runs} runs)");
}
