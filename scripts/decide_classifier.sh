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
# OUT/summary.json and OUT/summary.md are written (atomically) at the end.
# SMOKE=1: a few images, 2 DDIM steps, 1 run: checks the plumbing in minutes and decides nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
cand=${1:?usage: $0 CANDIDATE.onnx [OUT] [THREADS]}
out=${2:-training/runs/decide}
threads=${3:-2}
ds=${DIFFSHIELD:-target/release/diffshield}
data=${DATA:-../shared/data/cifar10_test_2000.bin}
[ -x "$ds" ] || { echo "build first: cargo build --release ($ds missing)" >&2; exit 2; }
[ -f "$cand" ] || { echo "$cand: no such file" >&2; exit 2; }
[ -f "$data" ] || { echo "$data: no such file" >&2; exit 2; }
mkdir -p "$out"
if [ "${SMOKE:-0}" = 1 ]; then
  clean_n=8 bpda_n=2 wb_n=1 runs=1 plan=(--t-star 40 --steps 2)
else
  clean_n=1000 bpda_n=128 wb_n=32 runs=3 plan=()
fi
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$out/decide.log" >&2; }

# Three model folders: shipped; candidate as [defended_classifier] (the deployment under test);
# candidate as [classifier] (its undefended accuracy).
folder() {
  local d=$1 extra=$2
  rm -rf "$d"; mkdir -p "$d"
  for f in models/*.onnx; do ln -s "$PWD/$f" "$d/"; done
  cp "$cand" "$d/classifier_candidate.onnx"
  { cat models/models.toml; printf '%s\n' "$extra"; } > "$d/models.toml"
}
folder "$out/models_defended" $'\n[defended_classifier]\nfile = "classifier_candidate.onnx"'
folder "$out/models_bare" ""
sed -i 's/^file = "classifier.onnx"/file = "classifier_candidate.onnx"/; /^int8_file = "classifier.int8.onnx"/d' \
  "$out/models_bare/models.toml"

# run NAME CMD...: CMD's JSON (its stdout; an attack's --out) into OUT/NAME.json unless it is
# there; its wall time beside it.
run() {
  local name=$1; shift
  [ -s "$out/$name.json" ] && { log "$name: kept"; return; }
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
}
common=(--data "$data" --threads "$threads" --seed 0 "${plan[@]}")
run bare_shipped "$ds" eval "${common[@]}" --limit "$clean_n" --no-purify
run bare_candidate "$ds" eval "${common[@]}" --limit "$clean_n" --no-purify --models "$out/models_bare"
for tier in s m; do
  for v in 1 5; do
    run "clean_${tier}_v${v}_shipped" "$ds" eval "${common[@]}" --limit "$clean_n" --denoiser "$tier" \
      --votes "$v"
    run "clean_${tier}_v${v}_candidate" "$ds" eval "${common[@]}" --limit "$clean_n" --denoiser "$tier" \
      --votes "$v" --models "$out/models_defended"
  done
done
attack=(attack "${common[@]}" --threat linf:8/255 --votes 1 --runs "$runs" --attack pgd
        --attack-batch 8)
for tier in s m; do
  for which in shipped candidate; do
    models=(); [ "$which" = candidate ] && models=(--models "$out/models_defended")
    run "bpda_${tier}_${which}" "$ds" "${attack[@]}" --denoiser "$tier" --mode bpda --pgd-steps 10 \
      --eot 4 --limit "$bpda_n" "${models[@]}"
    run "whitebox_${tier}_${which}" "$ds" "${attack[@]}" --denoiser "$tier" --mode white-box \
      --pgd-steps 5 --eot 2 --limit "$wb_n" "${models[@]}"
  done
done

python3 - "$out" "$cand" "${SMOKE:-0}" <<'EOF'
import json, os, sys
out, cand, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def load(name):
    with open(os.path.join(out, name + ".json")) as f:
        return json.load(f)
def secs(name):
    with open(os.path.join(out, name + ".seconds")) as f:
        return int(f.read())
def robust(name):
    return load(name)["results"][0]["robust_acc"]
s = {"candidate": os.path.basename(cand), "smoke": smoke,
     "images": load("bare_shipped")["images"],
     "undefended": {"shipped": load("bare_shipped")["clean_acc"],
                    "candidate": load("bare_candidate")["clean_acc"]},
     "defended": {}, "bpda": {}, "whitebox": {}, "seconds": {}}
for t in "sm":
    for v in (1, 5):
        s["defended"][f"{t}_v{v}"] = {w: load(f"clean_{t}_v{v}_{w}")["purified_acc"]
                                      for w in ("shipped", "candidate")}
    for a in ("bpda", "whitebox"):
        s[a][t] = {w: robust(f"{a}_{t}_{w}") for w in ("shipped", "candidate")}
for f in sorted(os.listdir(out)):
    if f.endswith(".seconds"):
        s["seconds"][f[:-8]] = secs(f[:-8])
gain = {t: s["defended"][f"{t}_v1"]["candidate"] - s["defended"][f"{t}_v1"]["shipped"] for t in "sm"}
held = {t: s["bpda"][t]["candidate"] >= s["bpda"][t]["shipped"] for t in "sm"}
s["rule"] = {"clean_gain_points": {t: round(100 * g, 1) for t, g in gain.items()},
             "bpda_not_lower": held,
             "keep": not smoke and all(g >= 0.05 - 1e-9 for g in gain.values()) and all(held.values())}
pct = lambda x: f"{100 * x:.1f} %"
md = [f"# Defended classifier decision: {s['candidate']}", "",
      "| figure | shipped classifier | candidate |", "|---|---|---|",
      f"| undefended clean, {s['images']} test images | {pct(s['undefended']['shipped'])} | {pct(s['undefended']['candidate'])} |"]
for t in "sm":
    for v in (1, 5):
        d = s["defended"][f"{t}_v{v}"]
        md.append(f"| defended clean, denoiser_{t}, {v} vote(s) | {pct(d['shipped'])} | {pct(d['candidate'])} |")
    md.append(f"| BPDA+EOT PGD-10 EOT 4, 128 images, 3 runs, denoiser_{t} | {pct(s['bpda'][t]['shipped'])} | {pct(s['bpda'][t]['candidate'])} |")
    md.append(f"| white-box+EOT PGD-5 EOT 2, 32 images, 3 runs, denoiser_{t} | {pct(s['whitebox'][t]['shipped'])} | {pct(s['whitebox'][t]['candidate'])} |")
r = s["rule"]
md += ["", f"Rule (training/README.md): clean gain {r['clean_gain_points']} points (need >= 5 for s and m), "
       f"BPDA not lower {r['bpda_not_lower']}: **{'keep' if r['keep'] else 'reject'}**"
       + (" (SMOKE run: sizes too small to decide anything)." if smoke else "."), "",
       "Wall time per measurement (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items())]
for name, text in (("summary.json", json.dumps(s, indent=2)), ("summary.md", "\n".join(md) + "\n")):
    tmp = os.path.join(out, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, name))
print("\n".join(md))
EOF
