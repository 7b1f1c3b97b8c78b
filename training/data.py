"""Data loading: the JPEG pack (training set) and CIFAR-10 .bin files (test set).

Formats (../shared/data/README.md):
- JPEG pack: records `[u8 split][u8 label][u16 LE length][length bytes of JPEG]`, concatenated.
- CIFAR-10 binary: records of 3073 bytes, 1 label byte then 1024 R, 1024 G, 1024 B bytes.
- Purified set (`diffshield purify-set`): a folder of CIFAR-10 binary shards and manifest.json.

Both loaders return `(images, labels)`: uint8 numpy arrays of shape [N,3,32,32] (RGB, NCHW) and
int64 [N]. Pixels become floats in [0,1] only on the training device (`to_unit`).
"""
from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_RECORD = 3073


def iter_pack(path: str | os.PathLike):
    """Yields (split, label, jpeg_bytes) for every record of a JPEG pack; checks framing."""
    data = Path(path).read_bytes()
    pos, n = 0, len(data)
    while pos < n:
        if pos + 4 > n:
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        split, label, length = struct.unpack_from("<BBH", data, pos)
        pos += 4
        if pos + length > n:
            raise ValueError(f"{path}: record at byte {pos - 4} claims {length} bytes, {n - pos} left")
        if label > 9:
            raise ValueError(f"{path}: label {label} out of range at byte {pos - 4}")
        yield split, label, data[pos:pos + length]
        pos += length


def decode_jpeg(buf: bytes) -> np.ndarray:
    """One JPEG -> uint8 [3,32,32] RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(buf)) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if a.shape != (32, 32, 3):
        raise ValueError(f"expected a 32x32 image, got {a.shape}")
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def load_pack(path: str | os.PathLike, limit: int | None = None, split: int | None = 0,
              cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a JPEG pack (records of `split` only; None keeps all) into uint8 NCHW arrays.

    With `cache_dir`, the decoded arrays are stored as .npz there (keyed by the pack's size and
    mtime) so later runs skip the ~20 s of JPEG decoding.
    """
    path = Path(path)
    cache = None
    if cache_dir is not None and limit is None:
        st = path.stat()
        cache = Path(cache_dir) / f"{path.stem}_{st.st_size}_{int(st.st_mtime)}_split{split}.npz"
        if cache.exists():
            z = np.load(cache)
            return z["images"], z["labels"]
    imgs, labels = [], []
    for s, label, buf in iter_pack(path):
        if split is not None and s != split:
            continue
        imgs.append(decode_jpeg(buf))
        labels.append(label)
        if limit is not None and len(imgs) >= limit:
            break
    if not imgs:
        raise ValueError(f"{path}: no records with split {split}")
    x, y = np.stack(imgs), np.asarray(labels, dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=x, labels=y)
        os.replace(tmp, cache)
    return x, y


def load_cifar_bin(path: str | os.PathLike, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads a CIFAR-10 binary file into uint8 [N,3,32,32] and int64 [N]."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise ValueError(f"{path}: size {raw.size} is not a positive multiple of {CIFAR_RECORD}")
    rec = raw.reshape(-1, CIFAR_RECORD)
    if limit is not None:
        rec = rec[:limit]
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{path}: label byte above 9")
    return np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32)), labels


PURIFIED_SET_FORMAT = "diffshield-purified-set/1"


def load_purified_set(path: str | os.PathLike, limit: int | None = None):
    """A purified training set made by `diffshield purify-set` (a folder: manifest.json and
    shard_NNNNN.bin, CIFAR-10 records, image-major with `draws` records per image). Returns every
    draw of the first `limit` images (all by default) as uint8 [N*draws,3,32,32] and labels;
    refuses a folder whose shards are missing or incomplete (a run still going or killed:
    resume it first)."""
    d = Path(path)
    m = json.loads((d / "manifest.json").read_text())
    if m.get("format") != PURIFIED_SET_FORMAT:
        raise ValueError(f"{d}: manifest format {m.get('format')!r}, expected {PURIFIED_SET_FORMAT!r}")
    n, draws, per = int(m["images"]), int(m["draws"]), int(m["shard_images"])
    want = n if limit is None else min(n, limit)
    xs, ys = [], []
    for k in range((want + per - 1) // per):
        shard = d / f"shard_{k:05d}.bin"
        expected = min(per, n - k * per) * draws * 3073
        if not shard.exists() or shard.stat().st_size != expected:
            raise ValueError(f"{shard}: missing or incomplete ({n} images x {draws} draws in "
                             f"shards of {per}); finish the purify-set run first")
        x, y = load_cifar_bin(shard)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs)[:want * draws], np.concatenate(ys)[:want * draws]
    return x, y


def load_images(path: str | os.PathLike, limit: int | None = None, cache_dir=None):
    """Any of the formats: a CIFAR-10 .bin, a JPEG .pack, or a purified-set folder (every draw
    of the first `limit` images)."""
    p = str(path)
    if Path(p).is_dir():
        return load_purified_set(p, limit)
    if p.endswith(".bin"):
        return load_cifar_bin(p, limit)
    return load_pack(p, limit=limit, cache_dir=cache_dir)


def write_cifar_bin(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes uint8 [N,3,32,32] images and labels as a CIFAR-10 binary file (for tests/tools)."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), -1)
    rec = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], images], axis=1)
    rec.tofile(path)


# ---------------------------------------------------------------------------------------------
# Device-side batches and augmentation (torch)


def to_unit(x_u8):
    """uint8 tensor -> float32 in [0,1]."""
    return x_u8.float().div_(255.0)


def random_flip(x, gen=None):
    """Horizontal flip of half the batch (per image)."""
    import torch

    m = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(m[:, None, None, None], x.flip(3), x)


def random_crop(x, pad: int = 4, gen=None):
    """Random 32x32 crop of the reflect-padded batch, one offset per image."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    iy = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
    ix = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, iy, ix]


def cutout(x, size: int = 8, gen=None):
    """Zeroes one random size x size square per image (may be partly outside)."""
    import torch

    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=gen)
    cx = torch.randint(0, w, (n,), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    m = ((ys - cy[:, None, None]).abs() <= size // 2) & ((xs - cx[:, None, None]).abs() <= size // 2)
    return x * (~m)[:, None].to(x.dtype)


class BatchStream:
    """Endless shuffled mini-batches of a uint8 image tensor kept on the device.

    Deterministic given the seed; `state()`/`load_state()` let `--resume` continue the same order.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, device):
        import torch

        self.x = torch.as_tensor(images).to(device)
        self.y = torch.as_tensor(labels).to(device)
        self.n = self.x.shape[0]
        self.bs = min(batch_size, self.n)
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = None

    def _make_perm(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self._perm = torch.randperm(self.n, generator=g).to(self.x.device)

    def next(self):
        if self._perm is None:
            self._make_perm()
        if self.pos + self.bs > self.n:
            self.epoch += 1
            self.pos = 0
            self._make_perm()
        idx = self._perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return self.x[idx], self.y[idx]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._make_perm()
