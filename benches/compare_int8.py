#!/usr/bin/env python3
"""int8 against float32: tract f32, tract int8 (examples/int8_timing.rs, interleaved in one
process) and onnxruntime f32 (and, for information, onnxruntime on the same int8 files), same
ONNX files, same thread count, same loop as benches/compare_ort.py: one denoiser call at
t=140 and one defended frame (T*=140, stride 10, eta 1, 1 vote: 14 denoiser calls with the DDIM
update in numpy, then the classifier), batch 1 and 8.

Prints, per case, the medians and the ratios
  speedup  = tract f32 time / tract int8 time   (> 1: int8 is faster; the target is >= 1.5)
  vs ort   = tract int8 time / onnxruntime f32 time   (< 1: int8 on tract beats ort f32)
  vs ort8  = tract int8 time / onnxruntime int8 time on the same files (issue 14's target at
             2 threads: <= 0.5)

With rounds > 1 (default 1) both sides run that many times in turn and every figure is the
median over the rounds (each ratio the median of the rounds' own ratios), so that a slow spell
of this VM (up to a third between runs) does not land on one side only.

Usage: python3 benches/compare_int8.py [threads] [reps] [s|m] [rounds]
(needs onnxruntime and numpy)
"""
import json, subprocess, sys, time
import numpy as np

import ort_frame  # the shared onnxruntime sessions and frame loop
from ort_frame import frame

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
tier = sys.argv[3] if len(sys.argv) > 3 else "s"
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1


def session(path):
    return ort_frame.session(path, threads)


def med(v):
    return sorted(v)[len(v) // 2]


def medians(fs, n):
    """Each f in its own block (a warm-up, then n timed runs); returns the median of each.
    Blocks, not f1 f2 f1 f2: every onnxruntime session has its own intra-op pool, whose threads
    spin for a while after a run, so alternating two sessions call by call had the idle one's
    spinning threads compete with the other's run on this 2-core machine (the int8 batch-8 call
    took 67 ms alternating, 31-33 ms in a block). The rounds take care of the drift."""
    out = []
    for f in fs:
        f()
        ts = []
        for _ in range(n):
            s = time.perf_counter(); f(); ts.append((time.perf_counter() - s) * 1e3)
        out.append(med(ts))
    return out


den32, den8 = session(f"models/denoiser_{tier}.onnx"), session(f"models/denoiser_{tier}.int8.onnx")
clf32, clf8 = session("models/classifier.onnx"), session("models/classifier.int8.onnx")
subprocess.run(["cargo", "build", "--release", "-q", "--example", "int8_timing"], check=True)
rows = {}  # case -> per round (tract f32, tract int8, ort f32, ort int8)
for _ in range(rounds):
    ours = subprocess.run(["target/release/examples/int8_timing", str(threads), str(reps), tier],
                          check=True, capture_output=True, text=True).stdout
    for line in ours.splitlines():
        r = json.loads(line)
        b = r["batch"]
        x = np.random.default_rng(1).random((b, 3, 32, 32), dtype=np.float32)
        xt, tt = 2 * x - 1, np.full((b,), 140, np.float32)
        c32, c8 = medians([lambda: den32.run(None, {"x_t": xt, "t": tt}),
                           lambda: den8.run(None, {"x_t": xt, "t": tt})], reps)
        f32, f8 = medians([lambda: frame(den32, clf32, x), lambda: frame(den8, clf8, x)],
                          (reps + 1) // 2)
        for kind, ort32, ort8 in (("call", c32, c8), ("frame", f32, f8)):
            rows.setdefault(f"{kind} b{b}", []).append(
                (r[f"f32_{kind}_ms"], r[f"int8_{kind}_ms"], ort32, ort8))


print(f"denoiser_{tier}, threads={threads} reps={reps} rounds={rounds}; ms are medians")
print(f"{'case':<12}{'tract f32':>10}{'tract i8':>10}{'ort f32':>10}{'ort i8':>10}"
      f"{'speedup':>9}{'vs ort':>8}{'vs ort8':>9}")
for case, v in rows.items():
    t32, t8, o32, o8 = (med([r[k] for r in v]) for k in range(4))
    speedup = med([r[0] / r[1] for r in v])
    vs_ort, vs_ort8 = med([r[1] / r[2] for r in v]), med([r[1] / r[3] for r in v])
    print(f"{case:<12}{t32:>10.1f}{t8:>10.1f}{o32:>10.1f}{o8:>10.1f}"
          f"{speedup:>9.2f}{vs_ort:>8.2f}{vs_ort8:>9.2f}")
