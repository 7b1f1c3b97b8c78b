"""ONNX export (opset 17) in the portable form the Rust runtime (tract) expects, plus checks.

- Legacy TorchScript exporter (`dynamo=False`), constant folding on, dynamic batch only
  (`batch` on axis 0 of every input and output).
- GroupNorm written out in ReduceMean/Sub/Mul/Sqrt/Div, attention and GroupNorm reshapes with
  constant shapes (-1 only in the batch position), nearest Resize with constant scales:
  `check_portable` refuses Shape, Gather, ConstantOfShape, Expand, Range, NonZero, Loop, If,
  GroupNormalization/InstanceNormalization and any Reshape whose shape is not a constant.
- Metadata (`metadata_props`): role, architecture, trained_t (denoisers), schedule, git-free
  provenance (training step, EMA), so the file documents itself.
- `verify_onnxruntime`: max abs difference against PyTorch on random inputs at two batch sizes.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import diffusion
from .models import Classifier, ClassifierExport, UNet, freeze_static_shapes, set_export_mode

OPSET = 17
FORBIDDEN_OPS = {"Shape", "Gather", "GatherElements", "GatherND", "ConstantOfShape", "Expand",
                 "Range", "NonZero", "Loop", "If", "Size", "GroupNormalization",
                 "InstanceNormalization", "ScatterND", "Where"}


def _export(module, args, path, input_names, output_names, metadata: dict, out_shapes: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = {n: {0: "batch"} for n in input_names + output_names}
    tmp = path.with_suffix(".tmp.onnx")
    kwargs = dict(export_params=True, opset_version=OPSET, do_constant_folding=True,
                  input_names=input_names, output_names=output_names, dynamic_axes=dyn)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            torch.onnx.export(module, args, str(tmp), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no `dynamo` argument (and is legacy by default)
            torch.onnx.export(module, args, str(tmp), **kwargs)
    import onnx

    m = onnx.load(str(tmp))
    # Static output shapes apart from the batch (the legacy exporter may leave symbolic H, W).
    for o in m.graph.output:
        dims = o.type.tensor_type.shape.dim
        want = out_shapes[o.name]
        assert len(dims) == len(want) + 1, (o.name, len(dims), want)
        dims[0].dim_param = "batch"
        for d, v in zip(list(dims)[1:], want):
            d.dim_value = int(v)
    for k, v in metadata.items():
        p = m.metadata_props.add()
        p.key, p.value = str(k), v if isinstance(v, str) else json.dumps(v)
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp))
    os.replace(tmp, path)
    check_portable(path)
    return path


def export_denoiser(model: UNet, path, trained_t=diffusion.TRAINED_T, extra_meta: dict | None = None):
    """Exports an eps-prediction UNet: inputs x_t [batch,3,32,32], t [batch] f32; output eps."""
    model = model.eval().float().cpu()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([float(trained_t[0]), float(trained_t[1])])
    freeze_static_shapes(model, x, t)
    set_export_mode(model, True)
    meta = {"role": "denoiser", "architecture": "unet", **{f"unet_{k}": v for k, v in model.config.items()},
            "trained_t": list(map(int, trained_t)),
            "schedule": {"kind": "linear", "beta_start": diffusion.BETA_START,
                         "beta_end": diffusion.BETA_END, "steps": diffusion.STEPS},
            "convention": "x0 = 2*image-1; t = 1-based integer step as f32; output eps",
            **(extra_meta or {})}
    try:
        with torch.no_grad():
            return _export(model, (x, t), path, ["x_t", "t"], ["eps"], meta, {"eps": [3, 32, 32]})
    finally:
        set_export_mode(model, False)


def export_classifier(model: Classifier | ClassifierExport, path, extra_meta: dict | None = None):
    """Exports the classifier with BN folded: input image [batch,3,32,32] in [0,1] -> logits."""
    if isinstance(model, Classifier):
        model = ClassifierExport(model.eval().float().cpu())
    model = model.eval().float().cpu()
    meta = {"role": "classifier", "architecture": "resnet9", "normalisation":
            {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
            **(extra_meta or {})}
    with torch.no_grad():
        return _export(model, (torch.rand(2, 3, 32, 32),), path, ["image"], ["logits"], meta,
                       {"logits": [10]})


def check_portable(path) -> dict:
    """Raises if the graph computes shapes at run time; returns op counts."""
    import onnx
    from collections import Counter

    m = onnx.load(str(path))
    ops = Counter(n.op_type for n in m.graph.node)
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise ValueError(f"{path}: non-portable ops {bad}")
    if any(o.version != OPSET for o in m.opset_import if o.domain in ("", "ai.onnx")):
        raise ValueError(f"{path}: opset is not {OPSET}")
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    for n in m.graph.node:
        if n.op_type == "Reshape":
            if n.input[1] not in consts:
                raise ValueError(f"{path}: Reshape {n.name} has a computed shape")
            shape = _const_value(m, n.input[1])
            if shape is not None and any(v == -1 for v in shape[1:]):
                raise ValueError(f"{path}: Reshape {n.name} has -1 outside the batch axis: {shape}")
        if n.op_type == "Resize":
            mode = {a.name: a for a in n.attribute}.get("mode")
            if mode is None or mode.s != b"nearest":
                raise ValueError(f"{path}: Resize {n.name} is not nearest")
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if any(d.dim_param for d in dims[1:]):
            raise ValueError(f"{path}: {vi.name} has a dynamic dimension besides the batch")
    return dict(ops)


def _const_value(m, name):
    from onnx import numpy_helper

    for i in m.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i).tolist()
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t).tolist()
    return None


def io_signature(path) -> dict:
    """{name: shape list with 'batch' for the dynamic axis} for inputs and outputs."""
    import onnx

    m = onnx.load(str(path))

    def sig(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {"inputs": {i.name: sig(i) for i in m.graph.input if i.name not in {x.name for x in m.graph.initializer}},
            "outputs": {o.name: sig(o) for o in m.graph.output}}


def read_metadata(path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def verify_onnxruntime(model: torch.nn.Module, path, kind: str, batches=(1, 5), seed: int = 0) -> float:
    """Max abs difference between PyTorch (fp32, eval) and onnxruntime over a few random batches."""
    import onnxruntime as ort

    model = model.eval().float().cpu()
    if kind == "classifier" and isinstance(model, Classifier):
        model = ClassifierExport(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batches:
        if kind == "classifier":
            x = torch.rand(b, 3, 32, 32, generator=g)
            with torch.no_grad():
                ref = model(x).numpy()
            got = sess.run(["logits"], {"image": x.numpy()})[0]
        else:
            x = torch.randn(b, 3, 32, 32, generator=g)
            t = torch.randint(1, 501, (b,), generator=g).float()
            with torch.no_grad():
                ref = model(x, t).numpy()
            got = sess.run(["eps"], {"x_t": x.numpy(), "t": t.numpy()})[0]
        worst = max(worst, float(np.max(np.abs(ref - got))))
    return worst


def manifest_snippet(kind: str, file: str, tier: str = "m", trained_t=diffusion.TRAINED_T) -> str:
    """The models.toml table for an exported model."""
    if kind == "classifier":
        return (f'[classifier]\nfile = "{file}"\ninput = "image"\noutput = "logits"\n'
                f'input_shape = [3, 32, 32]\nclasses = ["airplane", "automobile", "bird", "cat", "deer", '
                f'"dog", "frog", "horse", "ship", "truck"]\n')
    return (f'[denoisers.{tier}]\nfile = "{file}"\ninput = "x_t"\nt_input = "t"\noutput = "eps"\n'
            f'input_shape = [3, 32, 32]\ntrained_t = [{int(trained_t[0])}, {int(trained_t[1])}]\n')


# ---------------------------------------------------------------------------------------------
# Reading weights back from an ONNX file of this layout (e.g. the shipped models/*.onnx)


def _onnx_named_weights(path) -> dict:
    """{module parameter name: numpy array} from a graph exported with this file's layout.

    Named initializers keep their PyTorch names; the GroupNorm affine parameters, which the
    exporter folds into anonymous `onnx::Mul_*` / `onnx::Add_*` [1,C,1,1] constants, are mapped
    back through the node that uses them (`/<module>/Mul_1`, `/<module>/Add_1`).
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {k: v for k, v in init.items() if not k.startswith("onnx::")}
    for n in m.graph.node:
        for inp in n.input:
            if inp.startswith("onnx::") and inp in init:
                # scopes: '/down.0.0/n1/Mul_1_output_0' -> down.0.0.n1; '/net/net.11/MatMul...'
                # -> net.11 (a scope that repeats its parent's name is already qualified)
                parts = []
                for seg in n.output[0].lstrip("/").split("/")[:-1]:
                    if parts and seg.startswith(".".join(parts) + "."):
                        parts = [seg]
                    else:
                        parts.append(seg)
                prefix = ".".join(parts)
                if n.op_type == "Mul" and n.output[0].endswith("Mul_1_output_0"):
                    out[f"{prefix}.weight"] = init[inp].reshape(-1)
                elif n.op_type == "Add" and n.output[0].endswith("Add_1_output_0"):
                    out[f"{prefix}.bias"] = init[inp].reshape(-1)
                elif n.op_type == "MatMul":
                    out[f"{prefix}.weight"] = init[inp].T
    return out


def load_onnx_denoiser(path) -> UNet:
    """A UNet carrying the weights of a denoiser ONNX file of this layout (shipped or exported)."""
    w = _onnx_named_weights(path)
    model = UNet(base=int(w["conv_in.weight"].shape[0]))
    sd = model.state_dict()
    missing = sorted(set(sd) - set(w))
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    model.load_state_dict({k: torch.as_tensor(np.array(w[k])).reshape(sd[k].shape) for k in sd})
    return model.eval()


def load_onnx_classifier(path) -> ClassifierExport:
    """The BN-folded classifier of an ONNX file of this layout (e.g. models/classifier.onnx)."""
    w = _onnx_named_weights(path)
    widths = (w["net.0.0.weight"].shape[0], w["net.1.0.weight"].shape[0],
              w["net.4.0.weight"].shape[0], w["net.6.0.weight"].shape[0])
    model = ClassifierExport(Classifier(widths=widths).eval())
    sd = model.state_dict()
    missing = sorted(set(sd) - set(w))
    if missing:
        raise ValueError(f"{path}: no weights for {missing}")
    model.load_state_dict({k: torch.as_tensor(np.array(w[k])).reshape(sd[k].shape) for k in sd})
    return model.eval()


def main(argv=None):
    """python -m training.export_onnx --checkpoint RUN/last.pt --out FILE.onnx [--check-runtime]"""
    import argparse

    ap = argparse.ArgumentParser(description="Export a training checkpoint (EMA weights) to ONNX, "
                                             "check it (portability, onnxruntime, Rust runtime).")
    ap.add_argument("--checkpoint", required=True, help="last.pt of train_denoiser or train_classifier")
    ap.add_argument("--out", required=True, help="ONNX file to write")
    ap.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    ap.add_argument("--tier", default="m", help="denoiser tier for the manifest table / runtime check")
    ap.add_argument("--check-runtime", type=int, default=0, metavar="N",
                    help="also run the Rust runtime's eval on N test images with the candidate")
    ap.add_argument("--data", default="../shared/data/cifar10_test_2000.bin")
    a = ap.parse_args(argv)
    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    step = ck.get("step")
    meta = {"train_steps": step, "weights": "raw" if a.raw else "ema"}
    if "unet_config" in ck:
        from .train_denoiser import load_denoiser_checkpoint

        model = load_denoiser_checkpoint(a.checkpoint, use_ema=not a.raw)
        args = ck.get("args", {})
        trained = (int(args.get("t_min", 1)), int(args.get("t_max", 500)))
        export_denoiser(model, a.out, trained, meta)
        kind, snippet = "denoiser", manifest_snippet("denoiser", Path(a.out).name, a.tier, trained)
    else:
        from .train_classifier import load_classifier_checkpoint

        model = load_classifier_checkpoint(a.checkpoint, use_ema=not a.raw)
        export_classifier(model, a.out, meta)
        kind, snippet = "classifier", manifest_snippet("classifier", Path(a.out).name)
    diff = verify_onnxruntime(model, a.out, kind)
    print(f"exported {a.out} ({kind}, step {step}); ops {check_portable(a.out)}")
    print(f"max |onnxruntime - pytorch| = {diff:.3g}")
    print("models.toml table:\n" + snippet)
    if a.check_runtime:
        from .runtime import REPO, make_candidate_dir, runtime_eval

        d = make_candidate_dir(REPO / "training" / "runs" / "candidate_export",
                               classifier=a.out if kind == "classifier" else None,
                               denoisers={a.tier: a.out} if kind == "denoiser" else None)
        r = runtime_eval(d, a.data, a.check_runtime, a.tier if kind == "denoiser" else "s")
        print(f"Rust runtime: clean_acc {r['clean_acc']} purified_acc {r['purified_acc']} "
              f"({r['images']} images): {r['_command']}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
