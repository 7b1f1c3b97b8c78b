#!/usr/bin/env bash
# Accuracy and latency of 1, 3 and 5 votes: the 20 shipped samples (labels from the file
# names, 3 seeds each) and the first 500 CIFAR-10 test images (seed 0), denoiser_s, T*=140,
# stride 10, one thread. Prints one line per measurement. Usage: scripts/votes.sh [DS] [DATA]
set -euo pipefail
cd "$(dirname "$0")/.."
DS=${1:-target/release/diffshield}
DATA=${2:-../shared/data/cifar10_test_2000.bin}
samples() {
  python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
ok = sum(r["class"] == r["source"].rsplit("_", 1)[1][:-4] for r in rows)
ms = sorted(r["purify_ms"] + r["classify_ms"] for r in rows)
print("samples votes %s seed %s: %d/%d right, p50 %.1f ms per frame" % (sys.argv[1], sys.argv[2], ok, len(rows), ms[len(ms) // 2]))
' "$@"
}
test500() {
  python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print("test500 votes %s: defended %.1f %%, clean %.1f %%, %.1f ms per frame" % (sys.argv[1], 100 * r["purified_acc"], 100 * r["clean_acc"], r["ms"]["purified"] / r["images"]))
' "$@"
}
for v in 1 3 5; do
  for seed in 0 1 2; do
    "$DS" classify samples/[0-9]*.png --votes "$v" --seed "$seed" --threads 1 | samples "$v" "$seed"
  done
  "$DS" eval --data "$DATA" --limit 500 --votes "$v" --seed 0 --threads 1 | test500 "$v"
done
