#!/usr/bin/env python3
"""Static int8 quantization of the shipped models for tract (QOperator form).

Reads the calibration tensors written by `cargo run --release --example dump_calib` (the inputs
the denoiser really sees inside the project's purifier, at every step of the supported plans,
and the purified + clean images the classifier sees), runs onnxruntime's static quantization
in QOperator format (QLinearConv / QLinearMatMul, u8 activations, s8 weights, MinMax
calibration) restricted to ops tract 0.23.9 runs, then rewrites the graph for tract:

* every padded QLinearConv gets an explicit u8 `Pad` (value = the input zero point) in front
  and pads 0: the runtime's int8 conv (src/backend/tract_quant.rs) matches that form, and
  tract's own quantized conv runs its unpadded im2col about 1.6x faster than the padded one;
* the opset imports are reduced to the standard domain (the model uses no other).

The shipped models use `--per-channel` weights (one scale per output channel): the runtime's
int8 conv applies them at no cost. Its stride-1 kernel does not cover the denoisers' two
stride-2 convs, so those are excluded (`--exclude`) and stay float: left quantized, tract
would run them with per-channel requantization as a chain of generic broadcasting ops (53 ms
against 20 ms per denoiser_s call when every conv ran that way, docs/int8.md), and their u8
outputs would feed the next 1x1 conv directly, outside the pattern the runtime matches.

Usage (from the repository root; see tools/quantize/README.md for the full recipe):
  python3 tools/quantize/quantize.py --model classifier --dump /tmp/diffshield_calib_s --per-channel
  python3 tools/quantize/quantize.py --model denoiser_s --dump /tmp/diffshield_calib_s \
      --op-types Conv --per-channel --exclude /down.2.0/Conv,/down.5.0/Conv
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

# Ops whose QOperator forms tract 0.23.9 runs (standard domain only). Gemm is left in float:
# onnxruntime's quantized Gemm is com.microsoft.QGemm, which tract does not know (the Gemms
# are the tiny time-embedding and classifier-head projections).
OP_TYPES = ["Conv", "MatMul"]
# Every op type the int8 graphs may contain: the float originals plus the QOperator ops.
TRACT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "Pad",
    # float ops of the shipped graphs
    "Conv", "Relu", "MaxPool", "Add", "Sub", "Div", "Flatten", "MatMul", "Constant", "Mul",
    "Reshape", "ReduceMean", "Sqrt", "Sigmoid", "Unsqueeze", "Gemm", "Squeeze", "Transpose",
    "Concat", "Split", "Softmax", "Resize", "Cast", "Sin", "Cos",
}


class Reader(CalibrationDataReader):
    """Feeds the dumped tensors in fixed order, `batch` samples at a time."""

    def __init__(self, feeds, batch):
        n = len(next(iter(feeds.values())))
        self.batches = iter([{k: v[i:i + batch] for k, v in feeds.items()}
                             for i in range(0, n, batch)])

    def get_next(self):
        return next(self.batches, None)


def load_feeds(model, dump, max_samples, seed, purified_only=False):
    meta = json.load(open(os.path.join(dump, "meta.json")))
    if model == "classifier":
        x = np.fromfile(os.path.join(dump, "clf_x.f32"), np.float32).reshape(meta["clf_x"])
        if purified_only:  # clf_x holds the N purified images, then the N clean ones
            x = x[: len(x) // 2]
        feeds = {"image": x}
    else:
        tier = model.split("_")[1]
        if meta["denoiser"] != tier:
            sys.exit(f"{dump} was dumped with denoiser {meta['denoiser']}, not {tier}")
        x = np.fromfile(os.path.join(dump, "den_x.f32"), np.float32).reshape(meta["den_x"])
        t = np.fromfile(os.path.join(dump, "den_t.f32"), np.float32).reshape(meta["den_t"])
        feeds = {"x_t": x, "t": t}
    n = len(next(iter(feeds.values())))
    if max_samples and n > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        feeds = {k: v[keep] for k, v in feeds.items()}
    return feeds, meta


def explicit_pads(model):
    """Moves the padding of every QLinearConv into a u8 Pad op filled with the zero point."""
    g = model.graph
    nodes, count = [], 0
    for n in g.node:
        if n.op_type == "QLinearConv":
            pads = [a for a in n.attribute if a.name == "pads"]
            if pads and any(pads[0].ints):
                p = list(pads[0].ints)
                k = len(p) // 2
                name = n.name + "_pads"
                g.initializer.append(numpy_helper.from_array(
                    np.array([0, 0] + p[:k] + [0, 0] + p[k:], np.int64), name))
                out = n.input[0] + "_padded_for_" + n.name
                nodes.append(helper.make_node("Pad", [n.input[0], name, n.input[2]], [out],
                                              mode="constant", name=n.name + "_pad"))
                n.input[0] = out
                pads[0].ints[:] = [0] * len(p)
                count += 1
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return count


def check_ops(model):
    bad = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") or n.op_type not in TRACT_OPS})
    if bad:
        sys.exit(f"the quantized graph has ops outside tract's supported set: {bad}")
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def compare(f32_path, int8_path, feeds, n=64):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(f32_path, so)
    b = ort.InferenceSession(int8_path, so)
    idx = np.linspace(0, len(next(iter(feeds.values()))) - 1, n).astype(int)
    sub = {k: v[idx] for k, v in feeds.items()}
    ya, yb = a.run(None, sub)[0], b.run(None, sub)[0]
    err = np.abs(ya - yb)
    rel = np.linalg.norm(ya - yb) / np.linalg.norm(ya)
    out = {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "rel_l2": float(rel)}
    if ya.ndim == 2:
        out["argmax_agree"] = float((ya.argmax(1) == yb.argmax(1)).mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["classifier", "denoiser_s", "denoiser_m"])
    ap.add_argument("--dump", required=True, help="folder written by the dump_calib example")
    ap.add_argument("--models", default="models")
    ap.add_argument("--src", help="the float model (default: MODELS/MODEL.onnx); e.g. "
                    "models/classifier_purified.onnx with --model classifier")
    ap.add_argument("--out", help="default: SRC with .onnx replaced by .int8.onnx")
    ap.add_argument("--purified-only", action="store_true",
                    help="classifier: calibrate on the dump's purified images only (a "
                         "[defended_classifier] sees nothing else)")
    ap.add_argument("--per-channel", action="store_true",
                    help="per-channel weights (the shipped models; slow in tract's own int8 ops)")
    ap.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--max-samples", type=int, default=2400,
                    help="calibration samples used (a fixed random subset, seed 0)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--exclude", default="", help="comma-separated node names kept in float")
    ap.add_argument("--op-types", default=",".join(OP_TYPES),
                    help=f"op types to quantize (subset of {OP_TYPES})")
    args = ap.parse_args()

    src = args.src or os.path.join(args.models, args.model + ".onnx")
    out = args.out or os.path.splitext(src)[0] + ".int8.onnx"
    if args.purified_only and args.model != "classifier":
        sys.exit("--purified-only is for --model classifier")
    feeds, meta = load_feeds(args.model, args.dump, args.max_samples, 0, args.purified_only)
    n = len(next(iter(feeds.values())))
    print(f"{args.model}: {n} calibration samples from {args.dump} ({meta['images']} images)")
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[args.method]
        raw = os.path.join(tmp, "q.onnx")
        quantize_static(
            pre, raw, Reader(feeds, args.batch),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=[o for o in args.op_types.split(",") if o in OP_TYPES],
            per_channel=args.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=[s for s in args.exclude.split(",") if s],
            extra_options={"CalibMaxIntermediateOutputs": 8},
        )
        m = onnx.load(raw)
        pads = explicit_pads(m)
        check_ops(m)
        m.doc_string = (f"int8 (QOperator {args.op_types}, "
                        f"{'per-channel' if args.per_channel else 'per-tensor'} "
                        f"s8 weights, u8 activations, {args.method} calibration on {n} samples "
                        f"of calib/{' (purified only)' if args.purified_only else ''}, tools/quantize/quantize.py) "
                        f"of {os.path.basename(src)}")
        onnx.checker.check_model(m)
        onnx.save(m, out)
    ops = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(f"wrote {out}: {os.path.getsize(out)} bytes, {pads} explicit pads, ops {ops}")
    print("onnxruntime f32 vs int8 on 64 calibration samples:", compare(src, out, feeds))


if __name__ == "__main__":
    main()
