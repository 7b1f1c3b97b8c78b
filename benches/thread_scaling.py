#!/usr/bin/env python3
"""How much faster a second (or Nth) thread makes our calls and frames, in one run:
examples/frame_timing at 1 thread and at N threads in turn, R rounds, each round's figures the
median of its REPS repetitions, and the median over rounds printed per case with
speedup = 1-thread time / N-thread time (issue 14's target at 2 threads: >= 1.7 for batch-8
frames). Taking the two thread counts in turn within one run keeps this VM's drift (up to 25 %
between runs) out of the ratio.

Usage: python3 benches/thread_scaling.py [N] [rounds] [reps] [s|m|both] [kernel level]
(defaults 2 3 5 both; the level goes to DIFFSHIELD_KERNELS, default the best this CPU runs).
"""
import json, os, subprocess, sys
from collections import defaultdict

n = sys.argv[1] if len(sys.argv) > 1 else "2"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
reps = sys.argv[3] if len(sys.argv) > 3 else "5"
tier = sys.argv[4] if len(sys.argv) > 4 else "both"
level = sys.argv[5] if len(sys.argv) > 5 else None
env = dict(os.environ, **({"DIFFSHIELD_KERNELS": level} if level else {}))

subprocess.run(["cargo", "build", "--release", "-q", "--example", "frame_timing"], check=True)
times = defaultdict(list)  # (denoiser, batch, kind, threads) -> one median per round
kernels = None
for _ in range(rounds):
    for threads in ("1", n):
        out = subprocess.run(["target/release/examples/frame_timing", threads, reps, tier],
                             check=True, capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            r = json.loads(line)
            kernels = r["kernels"]
            for kind in ("call", "frame"):
                times[(r["denoiser"], r["batch"], kind, threads)].append(r[f"{kind}_ms"])


def median(v):
    return sorted(v)[len(v) // 2]


print(f"1 vs {n} threads, kernels={kernels}, {rounds} rounds of {reps} reps (ms: medians)")
print(f"{'case':<14}{'1 thread':>10}{n + ' threads':>12}{'speedup':>9}")
for (den, batch, kind, threads) in sorted(k for k in times if k[3] == "1"):
    one, many = median(times[(den, batch, kind, "1")]), median(times[(den, batch, kind, n)])
    print(f"{kind + ' ' + den + ' b' + str(batch):<14}{one:>10.1f}{many:>12.1f}{one / many:>9.2f}")
