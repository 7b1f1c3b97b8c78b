"""Shared fixtures. The tests run on one CPU thread in seconds; tests that need the shared data
set (../shared/data) or the Rust release binary skip with a message where they are absent."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

SHARED = REPO.parent / "shared" / "data"
PACK = SHARED / "cifar10_train_jpeg.pack"
TEST_BIN = SHARED / "cifar10_test_2000.bin"
CALIB_BIN = SHARED / "cifar10_train_calib_1000.bin"


def synthetic_images(n: int, seed: int = 0):
    """Smooth, class-dependent 32x32 images (learnable) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    imgs = []
    for lab in labels:
        base = np.stack([np.sin((lab + 1) * xx * 2), np.cos((lab + 2) * yy * 2), xx * yy])
        img = 0.5 + 0.35 * base + 0.05 * rng.standard_normal((3, 32, 32))
        imgs.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(imgs), labels.astype(np.int64)


@pytest.fixture(scope="session")
def small_bin(tmp_path_factory) -> Path:
    """A 64-image CIFAR-10 .bin: the first calibration images if the shared set exists, else synthetic."""
    from training.data import load_cifar_bin, write_cifar_bin

    p = tmp_path_factory.mktemp("data") / "small.bin"
    if CALIB_BIN.exists():
        x, y = load_cifar_bin(CALIB_BIN, limit=64)
    else:
        x, y = synthetic_images(64)
    write_cifar_bin(p, x, y)
    return p


@pytest.fixture(scope="session")
def diffshield_bin() -> Path:
    exe = REPO / "target" / "release" / "diffshield"
    if not exe.exists():
        pytest.skip("target/release/diffshield not built (cargo build --release): Rust runtime check SKIPPED")
    return exe
