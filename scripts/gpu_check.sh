#!/usr/bin/env bash
# The GPU check (issue 13), run on the device machine from the repo copy:
#   bash gpu-stage/all/gpu_check.sh STAGE [SECONDS]
# STAGE is what scripts/gpu_stage.sh made (binary and ONNX files xz-compressed, 500 test
# images, the onnx2torch wheel). Each step has a time cap and the whole run ends within SECONDS
# (default 450, inside the device call's timeout of 480): a step that errors or runs out of
# time is logged and the next still runs.
# Everything goes to $OUT (or ./gpu-out): gpu_check.log (the GPU, the CUDA libraries found and
# mapped, each step's exit and time), device_check_s.jsonl / device_check_m.jsonl (`diffshield
# device-check --backend cuda`: node placement, golden vectors, defended accuracy on 500 images
# against the CPU's figure for the same seed, batch 1/8/256 agreement, speed), torch.jsonl (the
# PyTorch peer on the same ONNX files, benches/gpu_torch.py) and cpu_threads.jsonl (issue 14:
# our CPU path against onnxruntime at 1-16 threads on the machine's 16 cores, if time is left).
# BACKEND=cpu runs the device-check steps on the CPU: the dry run here.
set -uo pipefail
stage=${1:?stage folder}; budget=${2:-450}
start=$(date +%s)
out=${OUT:-gpu-out}; mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
left() { echo $(( budget - ($(date +%s) - start) )); }
# step NAME CAP CMD...: CMD under a limit of CAP seconds or what is left of the budget.
step() {
  local name=$1 cap=$2; shift 2
  local t; t=$(left); t=$(( t - 5 < cap ? t - 5 : cap ))
  if [ "$t" -lt 15 ]; then echo "== $name: not run (${t}s left)"; return 0; fi
  local t0; t0=$(date +%s)
  echo "== $name (limit ${t}s)"
  # The steps are functions: run them in a child bash, which `timeout` can kill.
  timeout -k 5 "$t" bash -c 'set -o pipefail; "$@"' _ "$@"
  local rc=$?
  echo "== $name exit $rc after $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
}
echo "== $(date -u) $(uname -m) $(nproc) cores, budget ${budget}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
# Unpack the staged files next to themselves.
for f in "$stage"/diffshield.xz "$stage"/models/*.onnx.xz "$stage"/test500.bin.xz; do
  [ -e "${f%.xz}" ] || xz -dk "$f" || echo "could not unpack $f"
done
chmod +x "$stage/diffshield"
bin="$stage/diffshield"
# cuDNN, NVRTC, cuBLAS may live in the Python packages (nvidia/*/lib) rather than on the loader
# path: add every such folder, then say what the loader sees.
extra=$(python3 - <<'PY' 2>/dev/null
import glob, site
dirs = set()
for p in site.getsitepackages() + [site.getusersitepackages()]:
    dirs.update(glob.glob(p + "/nvidia/*/lib") + glob.glob(p + "/nvidia/cu*/lib"))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so libcudart.so libnvrtc.so libcublas.so libcublasLt.so libcudnn.so; do
  found=$( (ldconfig -p | grep -o "/[^ ]*${lib}[^ ]*" ; for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/${lib}* 2>/dev/null; done) | head -3 | tr '\n' ' ')
  echo "lib $lib: ${found:-NOT FOUND}"
done
export RUST_LOG=${RUST_LOG:-info}
backend=${BACKEND:-cuda}
check() {  # check TIER EXPECTED_ACC
  "$bin" device-check --backend "$backend" --models "$stage/models" --vectors tests/vectors \
    --data "$stage/test500.bin" --images 500 --expect-acc "$2" --denoiser "$1" --votes 1 \
    --batch 100 --batches 1,8,256 --speed-frames 50 --speed-batch 256 | tee "$out/device_check_$1.jsonl"
}
export -f check; export bin backend stage out
step "device-check denoiser_s" 130 check s 0.674
# Which libraries the process mapped: one classification, its maps read while it runs.
"$bin" classify samples/02_cat.png --backend "$backend" --models "$stage/models" --denoiser s \
  --votes 1 > /dev/null 2>&1 &
pid=$!; sleep 4
echo "mapped by a classify process:"
grep -oE '/[^ ]*(libcuda|nvrtc|cublas|cudnn|cudart)[^ ]*' "/proc/$pid/maps" 2>/dev/null | sort -u
wait $pid; echo "classify exit $?"
step "device-check denoiser_m" 150 check m 0.700
torch_peer() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$stage"/onnx2torch-*.whl || return 3
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benches/gpu_torch.py "$stage/models" s,m 50 256 \
    | tee "$out/torch.jsonl"
}
export -f torch_peer
step "pytorch peer" 100 torch_peer
cpu_threads() {  # ours (device-check --backend cpu, speed only) and onnxruntime, s, 1-16 threads
  for n in 1 2 4 8 16; do
    "$bin" device-check --backend cpu --threads "$n" --models "$stage/models" \
      --vectors tests/vectors --denoiser s --votes 1 --batches 1 --speed-frames 10 \
      --speed-batch 8 2>/dev/null | grep '"speed"' | sed "s/^/{\"threads\": $n, \"ours\": /; s/\$/}/"
    (cd benches && PYTHONUNBUFFERED=1 python3 - "$n" "../$stage/models" <<'PY'
import json, sys, time
import numpy as np
import ort_frame
n, models = int(sys.argv[1]), sys.argv[2]
den = ort_frame.session(f"{models}/denoiser_s.onnx", n)
clf = ort_frame.session(f"{models}/classifier.onnx", n)
def ms(b, k):
    x = np.random.default_rng(1).random((b, 3, 32, 32), dtype=np.float32)
    ort_frame.frame(den, clf, x)
    ts = []
    for _ in range(k):
        t = time.perf_counter(); ort_frame.frame(den, clf, x); ts.append(time.perf_counter() - t)
    return ts
one, eight = ms(1, 10), ms(8, 3)
print(json.dumps({"threads": n, "onnxruntime": {"frame_p50_ms": round(float(np.median(one)) * 1e3, 2),
                  "images_per_s_b8": round(8 / min(eight), 1)}}))
PY
    )
  done | tee "$out/cpu_threads.jsonl"
}
export -f cpu_threads
step "cpu threads (issue 14)" 90 cpu_threads
echo "== done after $(( $(date +%s) - start )) s"
