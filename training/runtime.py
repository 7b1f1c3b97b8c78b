"""Run a candidate model through the Rust runtime's own loader, `eval` and `attack`.

`make_candidate_dir` copies models/ (models.toml and the ONNX files) into a fresh folder and swaps
in the candidate file(s), updating `trained_t` from the candidate's metadata; the runtime then
loads it with `--models DIR`, which checks every manifest entry against the ONNX graph.

    python -m training.runtime --denoiser m=runs/den_m/denoiser_m.onnx -- eval \
        --data ../shared/data/cifar10_test_2000.bin --limit 200
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "target" / "release" / "diffshield"


def find_binary(explicit: str | None = None) -> Path | None:
    for cand in [explicit, os.environ.get("DIFFSHIELD_BIN"), DEFAULT_BIN]:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def make_candidate_dir(out_dir, classifier: str | None = None, denoisers: dict | None = None,
                       base_models=REPO / "models") -> Path:
    """Copy of `base_models` with the given ONNX files swapped in.

    denoisers: {tier: path}; a tier missing from the manifest is added as a new table.
    """
    from .export_onnx import manifest_snippet, read_metadata

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base_models, out)
    toml = (out / "models.toml").read_text()
    if classifier:
        shutil.copyfile(classifier, out / "classifier.onnx")
    for tier, path in (denoisers or {}).items():
        fname = f"denoiser_{tier}.onnx"
        shutil.copyfile(path, out / fname)
        meta = read_metadata(path)
        lo, hi = meta.get("trained_t", [1, 500])
        table = re.compile(rf"(?ms)^\[denoisers\.{re.escape(tier)}\]\n.*?(?=^\[|\Z)")
        snippet = manifest_snippet("denoiser", fname, tier, (lo, hi)) + "\n"
        if table.search(toml):
            toml = table.sub(lambda _m: snippet, toml)
        else:
            toml = toml.rstrip("\n") + "\n\n" + snippet
    (out / "models.toml").write_text(toml)
    return out


def run_cli(args: list[str], models_dir, binary=None, timeout: float | None = None) -> dict:
    """Runs `diffshield ARGS --models DIR`, returns the JSON object it prints on stdout."""
    exe = find_binary(binary)
    if exe is None:
        raise FileNotFoundError("target/release/diffshield not found: run `cargo build --release`")
    cmd = [str(exe), *args, "--models", str(models_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON on stdout of {' '.join(cmd)}:\n{p.stdout[-2000:]}")
    out = json.loads(lines[-1])
    out["_command"] = " ".join(cmd)
    return out


def runtime_eval(models_dir, data, limit: int, denoiser: str = "s", extra: list[str] | None = None,
                 binary=None, timeout=None, purify: bool = True) -> dict:
    args = ["eval", "--data", str(data), "--limit", str(limit), "--denoiser", denoiser, *(extra or [])]
    if "--seed" not in args:
        # The runtime draws a fresh OS seed unless told; evaluations compare on fixed noise.
        args += ["--seed", "0"]
    if not purify:
        args.append("--no-purify")
    return run_cli(args, models_dir, binary, timeout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", help="candidate classifier.onnx")
    ap.add_argument("--denoiser", action="append", default=[], metavar="TIER=FILE",
                    help="candidate denoiser for a tier (s, m or a new name); repeatable")
    ap.add_argument("--out", default=str(REPO / "training" / "runs" / "candidate_models"))
    ap.add_argument("--bin", default=None, help="diffshield binary (default target/release/diffshield)")
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the diffshield command and options")
    a = ap.parse_args(argv)
    dens = dict(d.split("=", 1) for d in a.denoiser)
    d = make_candidate_dir(a.out, a.classifier, dens)
    print(f"candidate models folder: {d}", file=sys.stderr)
    cli = a.cli[1:] if a.cli[:1] == ["--"] else a.cli
    if cli:
        res = run_cli(cli, d, a.bin)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
