#!/usr/bin/env python3
"""Runs the same work as examples/frame_timing.rs on onnxruntime (same ONNX files, same thread
count) and prints diffshield(tract) time / onnxruntime time for each case.

One denoiser call at t=140 and one defended frame (T*=140, stride 10, eta 1, 1 vote: 14 denoiser
calls with the DDIM update in numpy, then the classifier), batch 1 and 8, both denoisers.

Usage: python3 benches/compare_ort.py [threads] [reps] [kernel level]   (needs `pip install
onnxruntime numpy`). The level (avx512, avx2, portable, tract; default: the best this CPU runs) is
passed to our side as DIFFSHIELD_KERNELS; onnxruntime picks its own kernels.
"""
import json, os, subprocess, sys, time
import numpy as np

import ort_frame  # the shared onnxruntime sessions and frame loop
from ort_frame import frame

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
level = sys.argv[3] if len(sys.argv) > 3 else None
env = dict(os.environ, **({"DIFFSHIELD_KERNELS": level} if level else {}))

def session(path):
    return ort_frame.session(path, threads)

def median_ms(n, f):
    f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append((time.perf_counter() - s) * 1e3)
    return sorted(ts)[len(ts) // 2]


subprocess.run(["cargo", "build", "--release", "-q", "--example", "frame_timing"], check=True)
ours = subprocess.run(["target/release/examples/frame_timing", str(threads), str(reps)],
                      check=True, capture_output=True, text=True, env=env).stdout
clf = session("models/classifier.onnx")
first = json.loads(ours.splitlines()[0])
print(f"threads={threads} kernels={first['kernels']}  (ratio = our time divided by onnxruntime's; < 1 is faster)")
print(f"{'case':<22}{'ours ms':>10}{'ort ms':>10}{'ratio':>8}")
for line in ours.splitlines():
    r = json.loads(line)
    den = session(f"models/denoiser_{r['denoiser']}.onnx")
    x = np.random.default_rng(1).random((r["batch"], 3, 32, 32), dtype=np.float32)
    xt = 2 * x - 1
    tt = np.full((r["batch"],), 140, np.float32)
    call = median_ms(reps, lambda: den.run(None, {"x_t": xt, "t": tt}))
    fr = median_ms((reps + 1) // 2, lambda: frame(den, clf, x))
    for kind, ours_ms, theirs in (("call", r["call_ms"], call), ("frame", r["frame_ms"], fr)):
        name = f"{kind} {r['denoiser']} b{r['batch']}"
        print(f"{name:<22}{ours_ms:>10.1f}{theirs:>10.1f}{ours_ms / theirs:>8.2f}")
