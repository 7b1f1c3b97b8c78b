import io
import struct

import numpy as np
import pytest
import torch

from training import data, diffusion

from .conftest import CALIB_BIN, PACK, TEST_BIN, synthetic_images


def _make_pack(path, images, labels, quality=100):
    from PIL import Image

    with open(path, "wb") as f:
        for img, lab in zip(images, labels):
            buf = io.BytesIO()
            Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality, subsampling=0)
            b = buf.getvalue()
            f.write(struct.pack("<BBH", 0, int(lab), len(b)) + b)


def test_pack_roundtrip(tmp_path):
    x, y = synthetic_images(5)
    p = tmp_path / "t.pack"
    _make_pack(p, x, y)
    gx, gy = data.load_pack(p)
    assert gx.shape == (5, 3, 32, 32) and gx.dtype == np.uint8
    assert (gy == y).all()
    assert np.abs(gx.astype(int) - x.astype(int)).mean() < 3  # JPEG q100, 4:4:4
    # cache gives the same arrays
    cx, cy = data.load_pack(p, cache_dir=tmp_path / "cache")
    cx2, cy2 = data.load_pack(p, cache_dir=tmp_path / "cache")
    assert (cx == gx).all() and (cx2 == gx).all() and (cy2 == gy).all()


def test_pack_truncated_is_refused(tmp_path):
    x, y = synthetic_images(2)
    p = tmp_path / "t.pack"
    _make_pack(p, x, y)
    raw = p.read_bytes()
    (tmp_path / "bad.pack").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="claims"):
        data.load_pack(tmp_path / "bad.pack")


def test_cifar_bin_roundtrip_and_size_check(tmp_path):
    x, y = synthetic_images(3)
    p = tmp_path / "a.bin"
    data.write_cifar_bin(p, x, y)
    gx, gy = data.load_cifar_bin(p)
    assert (gx == x).all() and (gy == y).all()
    (tmp_path / "b.bin").write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match="multiple of 3073"):
        data.load_cifar_bin(tmp_path / "b.bin")


@pytest.mark.skipif(not PACK.exists(), reason="../shared/data absent: shared pack test SKIPPED")
def test_shared_pack_matches_calibration_bin():
    # README of the data set: the first 1000 pack images are the calibration images
    x, y = data.load_pack(PACK, limit=200)
    assert x.shape == (200, 3, 32, 32)
    assert set(np.unique(y)) <= set(range(10))
    if CALIB_BIN.exists():
        cx, cy = data.load_cifar_bin(CALIB_BIN, limit=200)
        assert (cy == y).all()
        assert (cx == x).all(), "JPEG decoding differs from the calibration .bin"


@pytest.mark.skipif(not TEST_BIN.exists(), reason="../shared/data absent: test .bin SKIPPED")
def test_shared_test_bin():
    x, y = data.load_cifar_bin(TEST_BIN)
    assert x.shape == (2000, 3, 32, 32) and y.shape == (2000,)
    assert np.bincount(y, minlength=10).min() > 100


def test_augment_and_stream_resume():
    x = torch.rand(6, 3, 32, 32)
    assert data.random_crop(x).shape == x.shape
    assert data.random_flip(x).shape == x.shape
    assert data.cutout(x, 8).shape == x.shape
    imgs, labs = synthetic_images(10)
    s1 = data.BatchStream(imgs, labs, 4, 3, "cpu")
    seq = [s1.next()[1].tolist() for _ in range(7)]
    s2 = data.BatchStream(imgs, labs, 4, 3, "cpu")
    for _ in range(3):
        s2.next()
    s3 = data.BatchStream(imgs, labs, 4, 3, "cpu")
    s3.load_state(s2.state())
    assert [s3.next()[1].tolist() for _ in range(4)] == seq[3:]


def test_schedule_convention():
    ab = diffusion.abar_table()
    assert ab.dtype == np.float64 and len(ab) == 1001
    assert ab[0] == 1.0 and ab[1] == pytest.approx(1 - 1e-4, abs=0)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert ab[500] == pytest.approx(np.prod(1 - betas[:500]), rel=1e-12)
    t = diffusion.sample_t(10000, 1, 500, "cpu")
    assert int(t.min()) == 1 and int(t.max()) == 500
    s = diffusion.Schedule()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    e = torch.randn_like(x0)
    tt = torch.tensor([1, 20, 140, 500])
    back = s.x0_from_eps(s.q_sample(x0, tt, e), tt, e, clip=False)
    assert torch.allclose(back, x0, atol=2e-5)
