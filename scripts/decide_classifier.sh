#!/usr/bin/env bash
# Decide whether a candidate defended classifier (e.g. one fine-tuned on purified images, issue
# 18) ships as models/'s [defended_classifier], by the rule in training/README.md, written
# before any candidate was measured:
#   keep it only if, on the first 1000 images of cifar10_test_2000.bin (never trained on),
#   defended clean accuracy (1 vote, seed 0) rises by at least 5 points for both denoisers, and
#   robust accuracy under BPDA+EOT (PGD-10, EOT 4, Linf 8/255, 128 images, 3 runs; mean over
#   the runs) does not fall for either.
# It also measures what the README reports but the rule does not use: 5 votes, both classifiers
# undefended, and a white-box+EOT screening (PGD-5, EOT 2, 32 images, 3 runs).
#
#   scripts/decide_classifier.sh CANDIDATE.onnx [OUT] [THREADS]
#
# Long (about 2-3 h on 2 cores): run it in the background. Every measurement is its own file in
# OUT (default training/runs/decide) and is skipped when present, so a stopped run resumes;
# OUT/summary.json and OUT/summary.md are written (atomically) at the end. The rule's own
# measurements run first, then the reported extras (EXTRAS=0 stops before them; the summary
# then says "not measured"). OUT holds one candidate: its SHA-256 is recorded there and another
# candidate is refused (exit 2), as is a SMOKE run in a full run's OUT or the reverse. Two
# copies with THREADS=1 on one OUT share the work, each measurement taken by one of them (a
# flock per measurement): on 2 cores that is faster than one copy with 2 threads, whose kernels
# scale 1.5-1.6x; each copy summarises the files present.
# ONLY=shipped measures the shipped classifier alone (CANDIDATE need not exist yet), e.g. on one
# core while the other still purifies the training set.
# SMOKE=1: a few images, 2 DDIM steps, 1 run: checks the plumbing in minutes and decides nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
cand=${1:?usage: $0 CANDIDATE.onnx [OUT] [THREADS]}
out=${2:-training/runs/decide}
threads=${3:-2}
ds=${DIFFSHIELD:-target/release/diffshield}
data=${DATA:-../shared/data/cifar10_test_2000.bin}
[ -x "$ds" ] || { echo "build first: cargo build --release ($ds missing)" >&2; exit 2; }
only=${ONLY:-}  # ONLY=shipped: the shipped classifier's measurements, before a candidate exists
[ "$only" = shipped ] || [ -f "$cand" ] || { echo "$cand: no such file" >&2; exit 2; }
[ -f "$data" ] || { echo "$data: no such file" >&2; exit 2; }
mkdir -p "$out"
if [ "${SMOKE:-0}" = 1 ]; then
  clean_n=8 bpda_n=2 wb_n=1 runs=1 plan=(--t-star 40 --steps 2)
else
  clean_n=1000 bpda_n=128 wb_n=32 runs=3 plan=()
fi
# Measurements are kept by name, so one OUT holds one candidate and one mode: OUT/candidate
# records them and another candidate (or SMOKE against a full run) is refused, not silently
# given the first one's figures. The shipped measurements do not depend on the candidate.
# pin NAME VALUE WHAT: OUT/NAME records VALUE; a different value already there is refused.
pin() {
  if [ -s "$out/$1" ] && [ "$(cat "$out/$1")" != "$2" ]; then
    echo "$out holds the measurements of $3 $(cat "$out/$1"), not $2: use another OUT" >&2
    exit 2
  fi
  echo "$2" > "$out/$1"
}
pin mode "smoke=${SMOKE:-0}" "mode"
if [ "$only" != shipped ]; then
  pin candidate "$(sha256sum "$cand" | cut -d' ' -f1)" "the candidate with SHA-256"
fi
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$out/decide.log" >&2; }

# Three model folders: shipped; candidate as [defended_classifier] (the deployment under test);
# candidate as [classifier] (its undefended accuracy). A shipped [defended_classifier] gives way
# to the candidate in both.
. scripts/manifest_edit.sh
defended_manifest() {
  without_defended_classifier models/models.toml
  printf '\n[defended_classifier]\nfile = "classifier_candidate.onnx"\n'
}
bare_manifest() {
  without_defended_classifier models/models.toml | classifier_as classifier_candidate.onnx
}
# folder DIR MANIFEST-COMMAND: DIR with links to models/, the candidate and the command's
# manifest. Left as it is when it already holds the same candidate and manifest, else renamed
# into place whole, so that a copy starting later does not pull a folder from under a
# measurement that runs in it.
folder() {
  local d=$1
  rm -rf "$d.new"; mkdir -p "$d.new"
  "$2" > "$d.new/models.toml"
  if cmp -s "$cand" "$d/classifier_candidate.onnx" && cmp -s "$d.new/models.toml" "$d/models.toml"; then
    rm -rf "$d.new"; return
  fi
  for f in models/*.onnx; do ln -s "$PWD/$f" "$d.new/"; done
  cp "$cand" "$d.new/classifier_candidate.onnx"
  rm -rf "$d"; mv "$d.new" "$d"
}
if [ "$only" != shipped ]; then
  folder "$out/models_defended" defended_manifest
  folder "$out/models_bare" bare_manifest
fi

# run NAME CMD...: CMD's JSON (its stdout; an attack's --out) into OUT/NAME.json unless it is
# there; its wall time beside it.
# A measurement another copy holds is left to it (its lock goes when that process ends).
run() {
  local name=$1; shift
  [ "$only" = shipped ] && [[ $name == *_candidate ]] && return
  [ -s "$out/$name.json" ] && { log "$name: kept"; return; }
  exec {lock}> "$out/.$name.lock"
  if ! flock -n "$lock"; then
    log "$name: another copy runs it"; exec {lock}>&-; return
  fi
  [ -s "$out/$name.json" ] && { exec {lock}>&-; return; }
  log "$name: $*"
  local t0; t0=$(date +%s)
  rm -f "$out/.$name.tmp"
  if [ "$2" = attack ]; then
    "$@" --out "$out/.$name.tmp" >> "$out/decide.log"
  else
    "$@" > "$out/.$name.tmp"
  fi
  mv "$out/.$name.tmp" "$out/$name.json"
  echo $(( $(date +%s) - t0 )) > "$out/$name.seconds"
  exec {lock}>&-
}
common=(--data "$data" --threads "$threads" --seed 0 "${plan[@]}")
attack=(attack "${common[@]}" --threat linf:8/255 --votes 1 --runs "$runs" --attack pgd
        --attack-batch 8)
# models_for WHICH: MODELS holds the --models flags that measure WHICH classifier defended.
models_for() {
  MODELS=()
  if [ "$1" = candidate ]; then MODELS=(--models "$out/models_defended"); fi
}
clean() {  # clean TIER VOTES WHICH
  models_for "$3"
  run "clean_${1}_v${2}_${3}" "$ds" eval "${common[@]}" --limit "$clean_n" --denoiser "$1" \
    --votes "$2" "${MODELS[@]}"
}
# The rule: defended clean with 1 vote and BPDA+EOT, both denoisers, both classifiers.
for tier in s m; do
  for which in shipped candidate; do clean "$tier" 1 "$which"; done
done
screen() {  # screen KIND TIER WHICH ATTACK-FLAGS...
  local kind=$1 tier=$2 which=$3; shift 3
  models_for "$which"
  run "${kind}_${tier}_${which}" "$ds" "${attack[@]}" --denoiser "$tier" "$@" "${MODELS[@]}"
}
for tier in s m; do
  for which in shipped candidate; do
    screen bpda "$tier" "$which" --mode bpda --pgd-steps 10 --eot 4 --limit "$bpda_n"
  done
done
# Reported beside the rule.
if [ "${EXTRAS:-1}" != 0 ]; then
  run bare_shipped "$ds" eval "${common[@]}" --limit "$clean_n" --no-purify
  run bare_candidate "$ds" eval "${common[@]}" --limit "$clean_n" --no-purify --models "$out/models_bare"
  for tier in s m; do
    for which in shipped candidate; do clean "$tier" 5 "$which"; done
  done
  for tier in s m; do
    for which in shipped candidate; do
      screen whitebox "$tier" "$which" --mode white-box --pgd-steps 5 --eot 2 --limit "$wb_n"
    done
  done
fi

python3 - "$out" "$cand" "${SMOKE:-0}" <<'EOF'
import json, os, sys
out, cand, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
W = ("shipped", "candidate")
def path(name):
    return os.path.join(out, name + ".json")
def load(name):
    if not os.path.exists(path(name)):
        return None
    with open(path(name)) as f:
        return json.load(f)
def pair(fmt, field):
    got = {w: load(fmt.format(w=w)) for w in W}
    return None if None in got.values() else {w: field(got[w]) for w in W}
purified = lambda j: j["purified_acc"]
robust = lambda j: j["results"][0]["robust_acc"]
rule_files = [f"clean_{t}_v1_{w}" for t in "sm" for w in W] + [f"bpda_{t}_{w}" for t in "sm" for w in W]
missing = [n for n in rule_files if load(n) is None]
if missing:  # another copy still runs them; it writes the summary when it is done
    print(f"rule measurements still running: {', '.join(missing)}; no summary yet")
    sys.exit(0)
s = {"candidate": os.path.basename(cand), "smoke": smoke,
     "images": load("clean_s_v1_shipped")["images"],
     "undefended": pair("bare_{w}", lambda j: j["clean_acc"]),
     "defended": {f"{t}_v{v}": pair(f"clean_{t}_v{v}_{{w}}", purified) for t in "sm" for v in (1, 5)},
     "bpda": {t: pair(f"bpda_{t}_{{w}}", robust) for t in "sm"},
     "whitebox": {t: pair(f"whitebox_{t}_{{w}}", robust) for t in "sm"},
     "seconds": {}}
for f in sorted(os.listdir(out)):
    if f.endswith(".seconds"):
        with open(os.path.join(out, f)) as fh:
            s["seconds"][f[:-8]] = int(fh.read())
gain = {t: s["defended"][f"{t}_v1"]["candidate"] - s["defended"][f"{t}_v1"]["shipped"] for t in "sm"}
held = {t: s["bpda"][t]["candidate"] >= s["bpda"][t]["shipped"] for t in "sm"}
s["rule"] = {"clean_gain_points": {t: round(100 * g, 1) for t, g in gain.items()},
             "bpda_not_lower": held,
             "keep": not smoke and all(g >= 0.05 - 1e-9 for g in gain.values()) and all(held.values())}
pct = lambda x: f"{100 * x:.1f} %"
def row(label, p):
    return f"| {label} | " + (" | ".join(pct(p[w]) for w in W) if p else "not measured | not measured") + " |"
md = [f"# Defended classifier decision: {s['candidate']}", "",
      "| figure | shipped classifier | candidate |", "|---|---|---|",
      row(f"undefended clean, {s['images']} test images", s["undefended"])]
for t in "sm":
    for v in (1, 5):
        md.append(row(f"defended clean, denoiser_{t}, {v} vote(s)", s["defended"][f"{t}_v{v}"]))
    md.append(row(f"BPDA+EOT PGD-10 EOT 4, 128 images, 3 runs, denoiser_{t}", s["bpda"][t]))
    md.append(row(f"white-box+EOT PGD-5 EOT 2, 32 images, 3 runs, denoiser_{t}", s["whitebox"][t]))
r = s["rule"]
md += ["", f"Rule (training/README.md): clean gain {r['clean_gain_points']} points (need >= 5 for s and m), "
       f"BPDA not lower {r['bpda_not_lower']}: **{'keep' if r['keep'] else 'reject'}**"
       + (" (SMOKE run: sizes too small to decide anything)." if smoke else "."), "",
       "Wall time per measurement (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items())]
for name, text in (("summary.json", json.dumps(s, indent=2)), ("summary.md", "\n".join(md) + "\n")):
    tmp = os.path.join(out, "." + name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, name))
print("\n".join(md))
EOF
