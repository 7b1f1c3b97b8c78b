#!/usr/bin/env bash
# Builds the CUDA binary here and stages what the GPU check needs into gpu-stage/all/ (ignored
# by git), printing its size against the device tool's 64 MiB: the working tree travels too, so
# all of the tracked tree but what the check reads (the ONNX files alone are 74 MB) is
# taken out of it with a sparse checkout while the call runs (`scripts/gpu_stage.sh restore` puts them back).
#
#   scripts/gpu_stage.sh            build, stage gpu-stage/all, shrink the tree
#   scripts/gpu_stage.sh restore    put the files back (git sparse-checkout disable)
#
# The part: the binary (stripped), classifier.onnx, denoiser_s.onnx and denoiser_m.onnx, all
# xz-compressed (the three f32 models are 59 MB raw, 54 MB in xz: with both denoisers in one
# part the whole check is one device call), models.toml, the first 500 test images (xz), the
# onnx2torch wheel of the PyTorch peer, scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = restore ]; then
  git sparse-checkout disable
  exit 0
fi
LIMIT=$((64 * 1024 * 1024))
cargo build --release --no-default-features --features cli,cuda
grep -qx '/gpu-stage/' .git/info/exclude 2>/dev/null || echo '/gpu-stage/' >> .git/info/exclude
d=gpu-stage/all
rm -rf gpu-stage
mkdir -p "$d/models"
strip -o "$d/diffshield" target/release/diffshield
xz -T0 -6 "$d/diffshield"
cp models/models.toml "$d/models/"
# From git, so that a second staging works while the tree is already shrunk.
for f in classifier.onnx denoiser_s.onnx denoiser_m.onnx; do
  git show "HEAD:models/$f" | xz -T0 -6 > "$d/models/$f.xz"
done
head -c $((500 * 3073)) ../shared/data/cifar10_test_2000.bin | xz -T0 -6 > "$d/test500.bin.xz"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d "$d" onnx2torch==1.5.15
cp scripts/gpu_check.sh "$d/"
# Of the tracked tree only what the check reads (the top-level files, benches, scripts,
# samples, the golden vectors but x0_hat, which it does not compare); the machine there has no
# Rust toolchain, so no sources.
git sparse-checkout set --no-cone '/*' '!/*/' '/benches/' '/scripts/' '/samples/' \
  '/tests/vectors/' '!/tests/vectors/x0_hat.npy'
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}' || true)
part=$(du -sb "$d" | cut -f1)
total=$((tree + part))
printf 'part %s: %.1f MiB (binary %.1f MiB xz) + tree %.1f MiB = %.1f MiB of 64 MiB: %s\n' "$d" \
  "$(echo "$part / 1048576" | bc -l)" "$(echo "$(stat -c %s "$d/diffshield.xz") / 1048576" | bc -l)" \
  "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" \
  "$([ "$total" -le "$LIMIT" ] && echo fits || echo TOO LARGE)"
[ "$total" -le "$LIMIT" ] || exit 3
echo "device call: carry [\"$d\"], timeout 480, command: bash $d/gpu_check.sh $d 450"
echo "afterwards:  scripts/gpu_stage.sh restore"
