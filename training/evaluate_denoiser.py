"""Evaluate a candidate denoiser: eps MSE and x0 PSNR per t, and purified clean accuracy by the
Rust runtime's own `eval`.

    python -m training.evaluate_denoiser --onnx training/runs/den_m/denoiser_m.onnx --tier m \
        --data ../shared/data/cifar10_test_2000.bin --images 500 --runtime-limit 500 \
        --compare models/denoiser_m.onnx --json-out training/runs/den_m/eval.json

Per t (default 20,60,100,140,200,300,500) on the first --images test images, with fixed noise
(seeded, the same for every model, so two models are compared on identical inputs):
- eps_mse: mean squared error of the predicted eps;
- psnr_db: PSNR of the one-call x0 estimate, clip((x_t - sqrt(1-abar) eps)/sqrt(abar), -1, 1)
  mapped back to [0,1], against the clean image (mean over images of the per-image PSNR);
  psnr_pooled_db uses the MSE pooled over all images.
A t outside the model's trained range (ONNX metadata `trained_t`) is marked `out_of_range`.
Purified accuracy: `diffshield eval --models DIR --denoiser TIER --limit N` (T* 140, stride 10,
eta 1, seed 0 unless --eval-args say otherwise) on a copy of models/ with the candidate swapped in.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import data, diffusion

DEFAULT_TS = "20,60,100,140,200,300,500"


class OrtDenoiser:
    def __init__(self, path, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.path = str(path)

    def __call__(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.sess.run(["eps"], {"x_t": x_t.astype(np.float32), "t": t.astype(np.float32)})[0]


def denoiser_metrics(fn, images_u8: np.ndarray, ts, seed: int = 0, batch: int = 50,
                     trained_t=None) -> dict:
    """{t: {eps_mse, psnr_db, psnr_pooled_db}} for a callable fn(x_t, t) -> eps (numpy)."""
    ab = diffusion.abar_table()
    x01 = images_u8.astype(np.float32) / 255.0
    x0 = 2.0 * x01 - 1.0
    out = {}
    for t in ts:
        rng = np.random.default_rng([seed, int(t)])
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        a, b = math.sqrt(ab[t]), math.sqrt(1.0 - ab[t])
        x_t = (a * x0.astype(np.float64) + b * eps.astype(np.float64)).astype(np.float32)
        pred = np.concatenate([fn(x_t[i:i + batch], np.full(len(x_t[i:i + batch]), float(t), np.float32))
                               for i in range(0, len(x_t), batch)])
        x0_hat = np.clip((x_t.astype(np.float64) - b * pred) / a, -1.0, 1.0)
        img_hat = (x0_hat + 1.0) / 2.0
        per_img_mse = ((img_hat - x01) ** 2).reshape(len(x01), -1).mean(1)
        rec = {"eps_mse": float(np.mean((pred.astype(np.float64) - eps) ** 2)),
               "psnr_db": float(np.mean(10 * np.log10(1.0 / np.maximum(per_img_mse, 1e-12)))),
               "psnr_pooled_db": float(10 * np.log10(1.0 / per_img_mse.mean()))}
        if trained_t and not (trained_t[0] <= t <= trained_t[1]):
            rec["out_of_range"] = True
        out[int(t)] = rec
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="candidate denoiser ONNX file")
    src.add_argument("--checkpoint", help="training checkpoint (last.pt; EMA weights are exported first)")
    ap.add_argument("--tier", default="m", help="manifest tier the candidate replaces (s, m) for the runtime eval")
    ap.add_argument("--data", default="../shared/data/cifar10_test_2000.bin")
    ap.add_argument("--images", type=int, default=256, help="test images for the per-t metrics")
    ap.add_argument("--t", default=DEFAULT_TS, help="comma-separated t values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", action="append", default=[],
                    help="other denoiser ONNX files (e.g. models/denoiser_m.onnx) measured on the same inputs")
    ap.add_argument("--runtime-limit", type=int, default=0,
                    help="images for the Rust runtime's purified accuracy (0 = skip)")
    ap.add_argument("--eval-args", default="", help="extra diffshield eval options, e.g. '--t-star 140 --eta 1'")
    ap.add_argument("--compare-runtime", action="store_true",
                    help="also run the runtime eval with the shipped models/ (same options)")
    ap.add_argument("--bin", default=None, help="diffshield binary")
    ap.add_argument("--models-dir", default=None,
                    help="where to build the candidate models folder (default training/runs/candidate_<tier>)")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)

    from .export_onnx import read_metadata

    onnx_path = a.onnx
    if a.checkpoint:
        from .export_onnx import export_denoiser
        from .train_denoiser import load_denoiser_checkpoint
        import torch

        ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
        args = ck.get("args", {})
        trained = (args.get("t_min", 1), args.get("t_max", 500))
        onnx_path = str(Path(a.checkpoint).with_name(f"denoiser_{a.tier}_eval.onnx"))
        export_denoiser(load_denoiser_checkpoint(a.checkpoint), onnx_path, trained,
                        extra_meta={"train_steps": ck.get("step"), "weights": "ema"})
    images, labels = data.load_cifar_bin(a.data, limit=a.images)
    ts = [int(v) for v in a.t.split(",")]
    report = {"data": a.data, "images": len(images), "seed": a.seed, "t": ts, "models": {}}
    for path in [onnx_path, *a.compare]:
        meta = read_metadata(path)
        trained = meta.get("trained_t")
        m = denoiser_metrics(OrtDenoiser(path, a.threads), images, ts, a.seed, trained_t=trained)
        name = "candidate" if path == onnx_path else str(path)
        report["models"][name] = {"file": str(path), "trained_t": trained, "per_t": m}
        print(f"{name}: " + "  ".join(f"t={t}: mse {r['eps_mse']:.4f} psnr {r['psnr_db']:.2f}dB"
                                       for t, r in m.items()), file=sys.stderr)
    if a.runtime_limit > 0:
        from .runtime import make_candidate_dir, runtime_eval

        from .runtime import REPO

        extra = a.eval_args.split()
        mdir = Path(a.models_dir or REPO / "training" / "runs" / f"candidate_{a.tier}")
        cand = make_candidate_dir(mdir, denoisers={a.tier: onnx_path})
        report["runtime_eval"] = runtime_eval(cand, a.data, a.runtime_limit, a.tier, extra,
                                              binary=a.bin)
        if a.compare_runtime:
            report["runtime_eval_shipped"] = runtime_eval(REPO / "models", a.data, a.runtime_limit,
                                                          a.tier, extra, binary=a.bin)
        for k in ("runtime_eval", "runtime_eval_shipped"):
            if k in report:
                r = report[k]
                print(f"{k}: purified_acc {r['purified_acc']} clean_acc {r['clean_acc']} "
                      f"({r['images']} images): {r['_command']}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
