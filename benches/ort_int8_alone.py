#!/usr/bin/env python3
"""onnxruntime's int8 denoiser call alone in a process, to tell its two speeds apart.

benches/compare_int8.py sees onnxruntime's int8 batch-8 call at about 70-87 ms in some runs and
about 120 ms in others. This times that call by itself: a fresh process, one session (with
`f32first`, the f32 denoiser's session made and run five times before it, as in
compare_int8.py), batch 8, `calls` calls, none discarded, printed in order. Run it a few
times: the slow speed comes and goes, between processes and within one, with nothing of ours
running (on 2026-12-07 one run of six took 115-148 ms for its first ten calls and 69-85 ms
after them; the other five 69-90 ms, 69-84 after their first call, medians 70.6-71.9), so it
belongs to onnxruntime on this VM, not to our harness, and onnxruntime's fast figures are the
ones to compare against.

Usage: python3 benches/ort_int8_alone.py [threads] [calls] [m|s] [f32first]
(needs onnxruntime and numpy)
"""
import sys, time
import numpy as np

import ort_frame

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
calls = int(sys.argv[2]) if len(sys.argv) > 2 else 15
tier = sys.argv[3] if len(sys.argv) > 3 else "m"
f32first = len(sys.argv) > 4 and sys.argv[4] == "f32first"

x = np.random.default_rng(1).random((8, 3, 32, 32), dtype=np.float32)
feed = {"x_t": 2 * x - 1, "t": np.full((8,), 140, np.float32)}
if f32first:
    den32 = ort_frame.session(f"models/denoiser_{tier}.onnx", threads)
    for _ in range(5):
        den32.run(None, feed)
den8 = ort_frame.session(f"models/denoiser_{tier}.int8.onnx", threads)
ms = []
for _ in range(calls):
    start = time.perf_counter()
    den8.run(None, feed)
    ms.append((time.perf_counter() - start) * 1e3)
rest = sorted(ms[1:])
print(f"denoiser_{tier}.int8 batch 8, {threads} threads{', after f32' if f32first else ''}: "
      f"{' '.join(f'{t:.0f}' for t in ms)} ms; median of all but the first {rest[len(rest) // 2]:.1f}")
