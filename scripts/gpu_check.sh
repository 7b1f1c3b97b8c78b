#!/usr/bin/env bash
# The GPU check, run on the device machine from the repo copy: bash gpu-stage/T/gpu_check.sh
# STAGE EXPECTED_ACC. Everything goes to one log in $OUT (or ./gpu-out): the GPU, the CUDA
# libraries found and used, then `diffshield device-check --backend cuda` (node placement,
# golden vectors, defended accuracy on 500 images against the CPU's figure, batch 1/8/256,
# speed). BACKEND=cpu runs the same script here (the dry run). About 3 minutes for denoiser_s, 6 for denoiser_m on an H200.
set -uo pipefail
stage=${1:?stage folder}; expect=${2:?expected CPU accuracy}
out=${OUT:-gpu-out}; mkdir -p "$out"
log="$out/gpu_check_$(basename "$stage").log"
exec > >(tee "$log") 2>&1
echo "== $(date -u) $(uname -m)"
nvidia-smi || echo "nvidia-smi failed"
# cuDNN, NVRTC, cuBLAS may live in the Python packages (nvidia/*/lib) rather than on the loader
# path: add every such folder, then say what the loader sees.
extra=$(python3 - <<'PY' 2>/dev/null
import glob, site
dirs = set()
for p in site.getsitepackages() + [site.getusersitepackages()]:
    dirs.update(glob.glob(p + "/nvidia/*/lib"))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so libcudart.so libnvrtc.so libcublas.so libcublasLt.so libcudnn.so; do
  found=$( (ldconfig -p | grep -o "/[^ ]*${lib}[^ ]*" ; for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/${lib}* 2>/dev/null; done) | head -3 | tr '\n' ' ')
  echo "lib $lib: ${found:-NOT FOUND}"
done
tier=$(basename "$stage")
bin="$stage/diffshield"
[ -x "$bin" ] || { xz -dk "$bin.xz" && chmod +x "$bin"; }
export RUST_LOG=${RUST_LOG:-info,tract_cuda=info}
t0=$(date +%s)
"$bin" device-check --backend "${BACKEND:-cuda}" --models "$stage/models" --vectors tests/vectors \
  --data "$stage/test500.bin" --images 500 --expect-acc "$expect" --denoiser "$tier" --votes 1 \
  --batches 1,8,256 --speed-frames 50 --speed-batch 256 | tee "$out/device_check_$tier.jsonl"
rc=${PIPESTATUS[0]}
echo "== device-check exit $rc after $(( $(date +%s) - t0 )) s"
# Which libraries the process mapped: run one classification and read its maps.
"$bin" classify samples/02_cat.png --backend "${BACKEND:-cuda}" --models "$stage/models" \
  --denoiser "$tier" --votes 1 > /dev/null 2>&1 &
pid=$!; sleep 5
grep -oE '/[^ ]*(libcuda|nvrtc|cublas|cudnn|cudart)[^ ]*' "/proc/$pid/maps" 2>/dev/null | sort -u
wait $pid
exit $rc
