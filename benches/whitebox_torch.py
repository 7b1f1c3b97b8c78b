#!/usr/bin/env python3
"""One white-box PGD-EOT gradient (denoiser_s or _m, T*=140 stride 10 = 14 DDIM steps, eta 1,
EOT 8, 8 images by default): diffshield's burn twin against PyTorch doing the same computation
from the same ONNX files (onnx2torch), same thread count, printed as a ratio (> 1: we are
slower).

PyTorch keeps the whole autograd graph of the 14 steps; diffshield stores x_t and eps per step
and recomputes one step at a time (bounded memory), so it does one more denoiser forward per
step by design. Usage (repo root, after `cargo build --release --example whitebox_timing`):
    python3 benches/whitebox_torch.py [threads] [images] [eot] [denoiser s|m]
PyTorch holds the whole graph in memory (9.4 GB peak for denoiser_m at 4 images x EOT 4, so
about 4x that at 8 x 8, more than this machine's 24 GiB): take 4 x 4 there, and for s to
compare the two.
"""
import json
import os
import subprocess
import sys
import time

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
images = int(sys.argv[2]) if len(sys.argv) > 2 else 8
eot = int(sys.argv[3]) if len(sys.argv) > 3 else 8
tier = sys.argv[4] if len(sys.argv) > 4 else "s"
if tier not in ("s", "m"):
    sys.exit(f"denoiser must be s or m, not {tier!r}")
os.environ["OMP_NUM_THREADS"] = str(threads)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx2torch import convert  # noqa: E402

from ddim_plan import plan  # noqa: E402  (benches/, the script's folder)

torch.set_num_threads(threads)


def torch_gradient(den, cls, x, labels):
    a, b, steps = plan()
    x = x.clone().requires_grad_(True)
    xs = x.repeat(eot, 1, 1, 1)
    y = labels.repeat(eot)
    xt = a * (2 * xs - 1) + b * torch.randn_like(xs)
    for t, sa_t, s1_t, sa_s, d, sigma in steps:
        eps = den(xt, torch.full((xt.shape[0],), float(t)))
        x0 = ((xt - s1_t * eps) / sa_t).clamp(-1, 1)
        xt = sa_s * x0 + d * eps + (sigma * torch.randn_like(xt) if sigma > 0 else 0)
    logits = cls(((xt + 1) / 2).clamp(0, 1))
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g / eot


def main():
    den = convert(onnx.load(f"models/denoiser_{tier}.onnx")).eval()
    cls = convert(onnx.load("models/classifier.onnx")).eval()
    h = torch.arange(32).float()
    x = torch.stack([0.5 + 0.4 * torch.sin((i + 1) * 0.3 * h[None, :, None] + 0.2 * h[None, None, :]
                                           + torch.arange(3).float()[:, None, None])
                     for i in range(images)])
    labels = torch.arange(images) % 10
    t0 = time.perf_counter()
    g = torch_gradient(den, cls, x, labels)
    torch_s = time.perf_counter() - t0
    assert torch.isfinite(g).all()
    out = subprocess.run(["target/release/examples/whitebox_timing", str(images), str(eot), "1",
                          tier], check=True, capture_output=True, text=True)
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"case": f"white-box PGD-EOT gradient, denoiser_{tier} 14 steps, EOT {eot}, "
                              f"{images} images, {threads} thread(s)",
                      "diffshield_s": round(ours["seconds"], 2), "pytorch_s": round(torch_s, 2),
                      "ratio": round(ours["seconds"] / torch_s, 2)}))


if __name__ == "__main__":
    main()
