#!/usr/bin/env bash
# Builds the CUDA binary here and stages what one GPU check call needs into gpu-stage/PART/
# (ignored by git), printing each part's size against the device tool's 64 MiB: the working
# tree travels too, so the tracked ONNX files (74 MB) are taken out of it with a sparse
# checkout while the calls run (`scripts/gpu_stage.sh restore` puts them back).
#
#   scripts/gpu_stage.sh            build, stage gpu-stage/s and gpu-stage/m, shrink the tree
#   scripts/gpu_stage.sh restore    put the ONNX files back (git sparse-checkout disable)
#
# Part s: the binary (stripped, xz), models.toml, classifier.onnx, denoiser_s.onnx, the first
# 500 test images, scripts/gpu_check.sh; part m: the same with denoiser_m.onnx instead. Each is a
# whole check (see scripts/gpu_check.sh); the device tool's call carries one part.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = restore ]; then
  git sparse-checkout disable
  exit 0
fi
LIMIT=$((64 * 1024 * 1024))
cargo build --release --no-default-features --features cli,cuda
grep -qx '/gpu-stage/' .git/info/exclude 2>/dev/null || echo '/gpu-stage/' >> .git/info/exclude
rm -rf gpu-stage
data=../shared/data/cifar10_test_2000.bin
for tier in s m; do
  d=gpu-stage/$tier
  mkdir -p "$d/models"
  strip -o "$d/diffshield" target/release/diffshield
  xz -T0 -6 "$d/diffshield"
  cp models/models.toml "$d/models/"
  # From git, so that a second staging works while the tree is already shrunk.
  for f in classifier.onnx "denoiser_$tier.onnx"; do git show "HEAD:models/$f" > "$d/models/$f"; done
  head -c $((500 * 3073)) "$data" > "$d/test500.bin"
  cp scripts/gpu_check.sh "$d/"
done
# The tracked tree without the ONNX files (they travel in the parts).
git sparse-checkout set --no-cone '/*' '!/models/*.onnx'
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}' || true)
for tier in s m; do
  part=$(du -sb "gpu-stage/$tier" | cut -f1)
  total=$((tree + part))
  printf 'part %s: %.1f MiB + tree %.1f MiB = %.1f MiB of 64 MiB %s\n' "$tier" \
    "$(echo "$part / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)" "$([ "$total" -le "$LIMIT" ] && echo ok || echo TOO LARGE)"
done
echo "device call: carry [\"gpu-stage/s\"], command: bash gpu-stage/s/gpu_check.sh gpu-stage/s 0.674"
echo "then:        carry [\"gpu-stage/m\"], command: bash gpu-stage/m/gpu_check.sh gpu-stage/m 0.700"
echo "afterwards:  scripts/gpu_stage.sh restore"
