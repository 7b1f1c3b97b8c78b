#!/usr/bin/env python3
"""The PyTorch peer of `diffshield device-check`'s speed figures on a GPU (issue 13): the same
ONNX files (onnx2torch) and the same defended frame (noise to T*=140, 14 DDIM steps of stride 10
with eta 1 and fresh noise, the classifier), fp32, one vote. Per denoiser: batch-1 frame p50 of
FRAMES frames after 5 untimed, and images/s at BATCH (best of 3 calls), in eager mode and with
the whole frame captured once as a CUDA graph and replayed (noise drawn inside the graph, so
every replay draws fresh noise). One JSON line per case.

    python3 benches/gpu_torch.py MODELS_DIR [s,m] [FRAMES] [BATCH]

Needs torch with CUDA and onnx2torch (scripts/gpu_check.sh installs the staged wheel).
"""
import json
import sys
import time

import numpy as np
import onnx
import torch
from onnx2torch import convert

from ddim_plan import plan  # benches/, the script's folder

models = sys.argv[1] if len(sys.argv) > 1 else "models"
tiers = (sys.argv[2] if len(sys.argv) > 2 else "s,m").split(",")
frames_n = int(sys.argv[3]) if len(sys.argv) > 3 else 50
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 256
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True

# Plain floats: the coefficients multiply CUDA tensors.
noise_a, noise_b, steps = plan()
noise_a, noise_b = float(noise_a), float(noise_b)
steps = [tuple(float(v) for v in step) for step in steps]


def frame(den, clf, x):
    xt = noise_a * (2 * x - 1) + noise_b * torch.randn_like(x)
    for t, sa_t, s1_t, sa_s, d, sig in steps:
        eps = den(xt, torch.full((x.shape[0],), t, device=x.device))
        x0 = ((xt - s1_t * eps) / sa_t).clamp(-1, 1)
        xt = sa_s * x0 + d * eps + sig * torch.randn_like(xt)
    return clf(((xt + 1) / 2).clamp(0, 1))


def timed(f, n):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def measure(den, clf, mode):
    def runner(n):
        x = torch.rand(n, 3, 32, 32, device=dev)
        if mode == "eager":
            return lambda: frame(den, clf, x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                frame(den, clf, x)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            frame(den, clf, x)
        return g.replay

    one = runner(1)
    timed(one, 5)
    p50 = float(np.median(timed(one, frames_n)))
    big = runner(batch)
    timed(big, 1)
    best = min(timed(big, 3))
    return {"frame_p50_ms": round(p50, 2), "images_per_s": round(batch / (best / 1e3), 1)}


clf = convert(onnx.load(f"{models}/classifier.onnx")).eval().to(dev)
print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}), flush=True)
for tier in tiers:
    den = convert(onnx.load(f"{models}/denoiser_{tier}.onnx")).eval().to(dev)
    for mode in ("eager", "cuda-graph"):
        try:
            with torch.no_grad():
                r = measure(den, clf, mode)
        except Exception as e:  # a failed capture is a finding, not the end of the run
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps({"peer": "pytorch", "denoiser": tier, "mode": mode, "batch": batch,
                          "frames": frames_n, **r}), flush=True)
