#!/usr/bin/env python3
"""Our kernel levels against tract's own ops, in one run: examples/frame_timing at each level
(DIFFSHIELD_KERNELS = avx512, avx2, portable-fma, portable, tract), the levels interleaved round
by round so that a slow spell of the machine hits all of them, and each level's median frame
time divided into tract's (> 1: that level is faster than tract's own path). portable-fma is the
portable level's plain Rust in its aarch64 configuration (fused multiply-adds, the 32-register
tiles) compiled for AVX2 + FMA: the nearest x86-64 measure of what ARM runs.

With `--isa avx2` tract itself is held to AVX2 + FMA (TRACT_CPU_ISA=-avx512f,-avx512vnni) for
every level, which is what tract runs on an AVX2-only CPU (Intel N100 class), so that our AVX2
kernels are compared with tract's AVX2 kernels; `--isa sse2` also removes AVX2 and FMA, tract's
portable kernels, the fair match for our portable level on x86-64 (on ARM tract has NEON).

Usage: python3 benches/compare_levels.py [threads] [reps] [rounds] [--isa native|avx2|sse2]
A level this CPU cannot run is left out with a line saying so (avx512 on an AVX2-only CPU).
"""
import json, os, statistics, subprocess, sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
isa = "native"
if "--isa" in sys.argv:
    isa = sys.argv[sys.argv.index("--isa") + 1]
    args.remove(isa)
threads = args[0] if len(args) > 0 else "1"
reps = args[1] if len(args) > 1 else "3"
rounds = int(args[2]) if len(args) > 2 else 3
tract_isa = {"native": None, "avx2": "-avx512f,-avx512vnni",
             "sse2": "-avx512f,-avx512vnni,-avx2,-fma"}[isa]
levels = {"native": ["avx512", "avx2", "portable-fma", "portable", "tract"],
          "avx2": ["avx2", "portable-fma", "portable", "tract"], "sse2": ["portable", "tract"]}[isa]

subprocess.run(["cargo", "build", "--release", "-q", "--example", "frame_timing"], check=True)
times = {}  # (level, case) -> frame ms of each round
for round_ in range(rounds):
    for level in list(levels):
        env = dict(os.environ, DIFFSHIELD_KERNELS=level)
        if tract_isa:
            env["TRACT_CPU_ISA"] = tract_isa
        run = subprocess.run(["target/release/examples/frame_timing", threads, reps],
                             capture_output=True, text=True, env=env)
        if run.returncode != 0 and round_ == 0 and "this CPU lacks" in run.stderr:
            # A level this CPU cannot run (avx512 on an AVX2-only CPU) is left out, said so.
            print(f"level {level} left out: {run.stderr.splitlines()[0]}")
            levels.remove(level)
            continue
        if run.returncode != 0:
            sys.exit(f"frame_timing at level {level} failed:\n{run.stderr}")
        out = run.stdout
        for line in out.splitlines():
            r = json.loads(line)
            times.setdefault((level, f"frame {r['denoiser']} b{r['batch']}"), []).append(r["frame_ms"])

cases = sorted({c for _, c in times}, key=lambda c: (c.split()[1], int(c.split()[2][1:])))
print(f"threads={threads} tract ISA={isa} rounds={rounds}; median frame ms, and tract's time / ours")
print(f"{'case':<14}" + "".join(f"{l + ' ms':>17}" for l in levels)
      + "".join(f"{l + ' x':>16}" for l in levels if l != "tract"))
for case in cases:
    med = {l: statistics.median(times[(l, case)]) for l in levels}
    print(f"{case:<14}" + "".join(f"{med[l]:>17.1f}" for l in levels)
          + "".join(f"{med['tract'] / med[l]:>16.2f}" for l in levels if l != "tract"))
