#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each, two at a time, on the stable
# toolchain (no sanitizer: `cargo fuzz -s none`), from the seed corpus in fuzz/seeds/. Prints
# per target the executions and crashes; crashing inputs land in fuzz/artifacts/TARGET/ (copy
# them to fuzz/regressions/TARGET/ once fixed: tests/fuzz_corpus.rs replays them in CI).
# Usage: scripts/fuzz.sh [SECONDS=600] [TARGET...]   (needs `cargo install cargo-fuzz`)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image cifar raw_frames config manifest attack_report)
cargo fuzz build -s none -O
mkdir -p fuzz/logs
run() {
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  cargo fuzz run -s none -O "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    > "fuzz/logs/$t.log" 2>&1 || true
  local execs crashes
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/logs/$t.log" | grep -o '[0-9]*$' || echo '?')
  crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
  echo "$t: ${secs} s, ${execs} executions, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs, ${crashes} crash files"
}
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run "${targets[i]}" &
  [ $((i + 1)) -lt ${#targets[@]} ] && run "${targets[i + 1]}" &
  wait
done
