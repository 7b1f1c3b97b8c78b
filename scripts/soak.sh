#!/usr/bin/env bash
# Soak run: N raw 32x32 frames through `diffshield run` on stdin, printing the process's RSS
# after the first frames and at the end, to show memory stays flat over a long stream.
# Usage: scripts/soak.sh [frames] [extra diffshield options...]
# Default options make each frame cheap (T*=20, one DDIM step) so 10 000 frames take minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${1:-10000}; shift || true
opts=("$@"); [ ${#opts[@]} -gt 0 ] || opts=(--t-star 20 --stride 20)
cargo build --release -q
out=$(mktemp); rss_log=$(mktemp)
python3 -c "
import sys, random
r = random.Random(0)
w = sys.stdout.buffer
for i in range($frames):
    w.write(bytes(r.getrandbits(8) for _ in range(32 * 32 * 3)))
" | ./target/release/diffshield run --raw 32x32 "${opts[@]}" > "$out" &
pid=$(pgrep -n -f "diffshield run --raw 32x32" || true)
while [ -z "$pid" ]; do sleep 0.2; pid=$(pgrep -n -f "diffshield run --raw 32x32" || true); done
while kill -0 "$pid" 2>/dev/null; do
  lines=$(wc -l < "$out")
  rss=$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status 2>/dev/null || true)
  [ -n "$rss" ] && echo "$lines $rss" >> "$rss_log"
  sleep 1
done
wait
first=$(awk '$1 >= 100 {print; exit}' "$rss_log")
last=$(tail -n 1 "$rss_log")
echo "frames done / RSS KiB after >=100 frames: $first"
echo "frames done / RSS KiB at the end:          $last"
tail -n 1 "$out"
rm -f "$out" "$rss_log"
