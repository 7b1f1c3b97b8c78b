#!/usr/bin/env python3
"""Runs the same work as examples/frame_timing.rs on onnxruntime (same ONNX files, same thread
count) and prints diffshield(tract) time / onnxruntime time for each case.

One denoiser call at t=140 and one defended frame (T*=140, stride 10, eta 1, 1 vote: 14 denoiser
calls with the DDIM update in numpy, then the classifier), batch 1 and 8, both denoisers.

Usage: python3 benches/compare_ort.py [threads] [reps] [kernel level] [rounds]   (needs `pip
install onnxruntime numpy`). The level (avx512, avx2, portable-fma, portable, tract; default:
the best this CPU runs; `best` says so explicitly) is passed to our side as DIFFSHIELD_KERNELS;
onnxruntime picks its own kernels. With rounds > 1 (default 1) both sides run that many times
in turn and each ratio is the median of the rounds' own ratios, so this VM's drift between runs
(up to 25 %) falls on both sides of a ratio alike.
"""
import json, os, subprocess, sys, time
import numpy as np

import ort_frame  # the shared onnxruntime sessions and frame loop
from ort_frame import frame

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
level = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "best" else None
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
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
clf = session("models/classifier.onnx")
dens = {tier: session(f"models/denoiser_{tier}.onnx") for tier in ("s", "m")}
cases = {}  # name -> ([our ms per round], [onnxruntime ms per round])
kernels = None
for _ in range(rounds):
    # Ours, then onnxruntime on the same cases: a round's two sides run minutes apart at most.
    ours = subprocess.run(["target/release/examples/frame_timing", str(threads), str(reps)],
                          check=True, capture_output=True, text=True, env=env).stdout
    for line in ours.splitlines():
        r = json.loads(line)
        kernels = r["kernels"]
        den = dens[r["denoiser"]]
        x = np.random.default_rng(1).random((r["batch"], 3, 32, 32), dtype=np.float32)
        xt = 2 * x - 1
        tt = np.full((r["batch"],), 140, np.float32)
        call = median_ms(reps, lambda: den.run(None, {"x_t": xt, "t": tt}))
        fr = median_ms((reps + 1) // 2, lambda: frame(den, clf, x))
        for kind, ours_ms, theirs in (("call", r["call_ms"], call), ("frame", r["frame_ms"], fr)):
            mine, ort_ms = cases.setdefault(f"{kind} {r['denoiser']} b{r['batch']}", ([], []))
            mine.append(ours_ms)
            ort_ms.append(theirs)


def median(v):
    return sorted(v)[len(v) // 2]


print(f"threads={threads} kernels={kernels} rounds={rounds}  (ratio = our time divided by "
      f"onnxruntime's, the median of the rounds' ratios; < 1 is faster)")
print(f"{'case':<22}{'ours ms':>10}{'ort ms':>10}{'ratio':>8}")
for name, (mine, ort_ms) in cases.items():
    ratio = median([a / b for a, b in zip(mine, ort_ms)])
    print(f"{name:<22}{median(mine):>10.1f}{median(ort_ms):>10.1f}{ratio:>8.2f}")
