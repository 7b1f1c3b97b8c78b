#!/usr/bin/env bash
# The strict attack protocol with its gradients on a GPU (burn's wgpu twin on Vulkan), sized to
# one device call of at most 9 minutes (issue 17).
#
#   scripts/gpu_attack.sh stage [s|m]     here: build with --features wgpu, stage
#                                         gpu-stage/attack-T/ and print its size against 64 MiB
#   bash STAGE/gpu_attack.sh run STAGE [SECONDS]
#                                         on the device (or here, with lavapipe, as a dry run):
#                                         find the Vulkan driver, measure gradient throughput,
#                                         size the image count to SECONDS (default 480) and run
#                                         --protocol strict; everything goes to $OUT
#                                         (GRAD_DEVICE=cpu EOT=2: a quick dry run on the CPU)
#
# Final accuracies are measured on the deployed backend (tract on the CPU: 16 cores there);
# only the gradients move to the GPU.
set -uo pipefail
cmd=${1:-}
if [ "$cmd" = stage ]; then
  set -e
  cd "$(dirname "$0")/.."
  tier=${2:-s}
  LIMIT=$((64 * 1024 * 1024))
  cargo build --release --no-default-features --features cli,wgpu
  grep -qx '/gpu-stage/' .git/info/exclude 2>/dev/null || echo '/gpu-stage/' >> .git/info/exclude
  d=gpu-stage/attack-$tier
  rm -rf "$d"; mkdir -p "$d/models"
  strip -o "$d/diffshield" target/release/diffshield
  xz -T0 -6 "$d/diffshield"
  # The strict preset attacks the defended modes only (white-box, known-noise), so where the
  # manifest has a [defended_classifier] only that file travels (two 26 MB classifiers do not
  # fit), staged as the [classifier] of a manifest without the table.
  dc=$(awk '/^\[/ { t = $0 } t == "[defended_classifier]" && /^file *=/ { gsub(/^[^"]*"|".*$/, ""); print }' \
    models/models.toml)
  if [ -n "$dc" ]; then
    . scripts/manifest_edit.sh
    without_defended_classifier models/models.toml | classifier_as "$dc" > "$d/models/models.toml"
  else
    cp models/models.toml "$d/models/"
  fi
  for f in "${dc:-classifier.onnx}" "denoiser_$tier.onnx"; do git show "HEAD:models/$f" > "$d/models/$f"; done
  head -c $((512 * 3073)) ../shared/data/cifar10_test_2000.bin > "$d/test512.bin"
  cp scripts/gpu_attack.sh "$d/"
  part=$(du -sb "$d" | cut -f1)
  tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | grep -v '^$' | awk '{s+=$1} END {print s}')
  onnx=$(git ls-files -z 'models/*.onnx' | xargs -0 stat -c %s | awk '{s+=$1} END {print s}')
  total=$((part + tree - onnx))
  printf 'part %s: %.1f MiB (binary %.1f MiB xz) + tree without ONNX %.1f MiB = %.1f MiB of 64 MiB: %s\n' \
    "$d" "$(echo "$part / 1048576" | bc -l)" "$(echo "$(stat -c %s "$d/diffshield.xz") / 1048576" | bc -l)" \
    "$(echo "($tree - $onnx) / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" \
    "$([ "$total" -le "$LIMIT" ] && echo fits || echo TOO LARGE)"
  [ "$total" -le "$LIMIT" ] || exit 3
  echo "device call: carry [\"$d\"], timeout 560, command: bash $d/gpu_attack.sh run $d 480"
  echo "(shrink the tree first as scripts/gpu_stage.sh does: the ONNX files travel in the part)"
  exit 0
fi
[ "$cmd" = run ] || { echo "usage: $0 stage [s|m] | run STAGE [SECONDS]" >&2; exit 2; }
stage=${2:?stage folder}; budget=${3:-480}
start=$(date +%s)
out=${OUT:-gpu-out}; mkdir -p "$out"
exec > >(tee "$out/gpu_attack.log") 2>&1
tier=${stage##*-}
echo "== $(date -u) $(uname -m) denoiser $tier, budget $budget s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d; do ls "$d" 2>/dev/null | sed "s|^|vulkan icd $d/|"; done
bin="$stage/diffshield"
[ -x "$bin" ] || { xz -dk "$bin.xz" && chmod +x "$bin"; }
threads=$(nproc)
eot=${EOT:-20}
common=(--data "$stage/test512.bin" --models "$stage/models" --denoiser "$tier"
        --grad-device "${GRAD_DEVICE:-wgpu}" --threads "$threads" --attack-batch 8 --eot "$eot")
# 1. Throughput: one image, 2 steps of every strict attack (9 gradients), one mode (the price
# includes the wgpu shader compilation: an upper bound).
t0=$(date +%s.%N)
"$bin" attack "${common[@]}" --protocol strict --limit 1 --pgd-steps 2 --runs 1 \
  --mode white-box --no-sanity-probe --out "$out/throughput.json" > /dev/null || exit 1
t1=$(date +%s.%N)
per_grad=$(python3 -c "import json;r=json.load(open('$out/throughput.json'));print(r['results'][0]['seconds']/9)")
echo "throughput: $(python3 -c "print(round($eot/$per_grad,2))") image x EOT sample x step per second (one gradient of EOT $eot in $per_grad s; call $(python3 -c "print(round($t1-$t0,1))") s)"
# 2. Size the strict run: 403 gradients per image and mode (APGD-CE 101, APGD-DLR 101,
# PGD-200, PGD-1), white-box and known-noise, plus evaluation (10 runs x 4 attacks).
left=$(( budget - ($(date +%s) - start) - 30 ))
read -r images steps < <(python3 - "$per_grad" "$left" <<'PY'
import sys
g, left = float(sys.argv[1]), float(sys.argv[2])
for steps in (200, 100, 50, 20, 10, 5):
    grads = 403 if steps == 200 else 3 * (steps + 1)  # aa-rand (2 x APGD) + PGD + PGD-1
    n = int(left / (2 * grads * g * 1.15))         # two modes, 15 % for evaluation
    if n >= 8 or steps == 5:
        print(max(n, 1), steps)
        break
PY
)
echo "strict run: $images images, $steps steps (the preset: 100 APGD / 200 PGD steps; fewer is a screening run) in $left s"
steps_arg=(); [ "$steps" -lt 200 ] && steps_arg=(--pgd-steps "$steps")
"$bin" attack "${common[@]}" --protocol strict --limit "$images" "${steps_arg[@]}" \
  --out "$out/strict_$tier.json" --markdown "$out/strict_$tier.md" > /dev/null
rc=$?
echo "== strict exit $rc after $(( $(date +%s) - start )) s"
cat "$out/strict_$tier.md" 2>/dev/null
exit $rc
