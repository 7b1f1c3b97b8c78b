"""ONNX export: portable graph (no Shape/Gather), onnxruntime matches PyTorch, the Rust runtime
loads it, and the shipped-size architectures have the shipped models' interface."""
import numpy as np
import onnx
import pytest
import torch

from training import export_onnx as ex
from training.models import Classifier, UNet, count_params, make_denoiser
from training.runtime import make_candidate_dir, runtime_eval

from .conftest import REPO, TEST_BIN


def _randomise(model, seed=0):
    """Non-trivial weights everywhere (BN statistics, GroupNorm affine), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    den = _randomise(UNet(base=8))
    clf = _randomise(Classifier(widths=(8, 16, 32, 64)))
    return {"den": den, "clf": clf, "den_path": ex.export_denoiser(den, d / "den.onnx", (1, 300)),
            "clf_path": ex.export_classifier(clf, d / "clf.onnx"), "dir": d}


def test_export_is_portable(tiny_models):
    for key in ("den_path", "clf_path"):
        m = onnx.load(str(tiny_models[key]))
        ops = {n.op_type for n in m.graph.node}
        assert not ops & {"Shape", "Gather", "If", "ConstantOfShape", "Expand", "GroupNormalization"}, ops
        assert m.opset_import[0].version == 17
        ex.check_portable(tiny_models[key])
    ops = ex.check_portable(tiny_models["den_path"])
    assert {"ReduceMean", "Sqrt", "Div", "Resize", "Softmax"} <= set(ops)
    meta = ex.read_metadata(tiny_models["den_path"])
    assert meta["trained_t"] == [1, 300] and meta["role"] == "denoiser"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_check_portable_catches_dynamic_shapes(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1).sum(1, keepdim=True)

    p = tmp_path / "bad.onnx"
    torch.onnx.export(Bad(), (torch.rand(2, 3, 4, 4),), str(p), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    with pytest.raises(ValueError):
        ex.check_portable(p)


def test_onnxruntime_matches_pytorch(tiny_models):
    d_den = ex.verify_onnxruntime(tiny_models["den"], tiny_models["den_path"], "denoiser", batches=(1, 3))
    d_clf = ex.verify_onnxruntime(tiny_models["clf"], tiny_models["clf_path"], "classifier", batches=(1, 3))
    print(f"\nmax |ort - torch|: denoiser {d_den:.3g}, classifier {d_clf:.3g}")
    assert d_den < 1e-5 and d_clf < 1e-4


def test_export_mode_matches_training_mode():
    """The written-out GroupNorm and attention equal the fused training kernels."""
    from training.models import freeze_static_shapes, set_export_mode

    m = _randomise(UNet(base=8))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 400.0])
    with torch.no_grad():
        a = m(x, t)
        freeze_static_shapes(m, x, t)
        set_export_mode(m, True)
        b = m(x, t)
    assert (a - b).abs().max() < 1e-5


def test_rust_runtime_loads_export(tiny_models, diffshield_bin, tmp_path, small_bin):
    data = TEST_BIN if TEST_BIN.exists() else small_bin
    cand = make_candidate_dir(tmp_path / "models", classifier=str(tiny_models["clf_path"]),
                              denoisers={"s": str(tiny_models["den_path"])})
    toml = (cand / "models.toml").read_text()
    assert "trained_t = [1, 300]" in toml
    res = runtime_eval(cand, data, 2, "s", ["--t-star", "60", "--stride", "20"], binary=diffshield_bin,
                       timeout=300)
    assert res["images"] == 2 and 0.0 <= res["purified_acc"] <= 1.0
    assert res["plan_timesteps"] == [60, 40, 20, 0]
    # T* beyond the candidate's trained range is refused by the runtime (exit 2)
    with pytest.raises(RuntimeError, match="exited 2"):
        runtime_eval(cand, data, 1, "s", ["--t-star", "400"], binary=diffshield_bin, timeout=120)


SHIPPED = [("classifier", REPO / "models" / "classifier.onnx"),
           ("s", REPO / "models" / "denoiser_s.onnx"),
           ("m", REPO / "models" / "denoiser_m.onnx")]


@pytest.mark.parametrize("kind,path", SHIPPED, ids=[k for k, _ in SHIPPED])
def test_shipped_size_interface(kind, path, tmp_path):
    if not path.exists():
        pytest.skip(f"{path} absent")
    shipped = onnx.load(str(path))
    shipped_params = sum(int(np.prod(t.dims)) for t in shipped.graph.initializer)
    if kind == "classifier":
        model = _randomise(Classifier())
        out = ex.export_classifier(model, tmp_path / "c.onnx")
        ours = count_params(ex.ClassifierExport(model)) + 6  # + mean, std
    else:
        model = _randomise(make_denoiser(kind))
        out = ex.export_denoiser(model, tmp_path / "d.onnx")
        ours = count_params(model)
    got, want = ex.io_signature(out), ex.io_signature(path)
    assert got["inputs"] == want["inputs"]
    assert list(got["outputs"]) == list(want["outputs"])
    for name, shape in want["outputs"].items():
        # the shipped eps output leaves H, W symbolic; ours are the static 32, 32
        assert len(got["outputs"][name]) == len(shape)
        assert [d for d in shape if isinstance(d, int) and d] == \
            [d for d, w in zip(got["outputs"][name], shape) if isinstance(w, int) and w]
    print(f"\n{kind}: params ours {ours}, shipped {shipped_params}")
    assert ours == shipped_params
    # same parameter tensor names and shapes (BN-folded classifier / UNet module names)
    shipped_named = {t.name: list(t.dims) for t in shipped.graph.initializer if not t.name.startswith("onnx::")}
    ours_named = {t.name: list(t.dims) for t in onnx.load(str(out)).graph.initializer
                  if not t.name.startswith("onnx::")}
    assert ours_named == shipped_named


@pytest.mark.parametrize("kind,path", SHIPPED, ids=[k for k, _ in SHIPPED])
def test_shipped_weights_reproduce_shipped_graph(kind, path):
    """Our PyTorch architecture with the shipped weights computes what the shipped ONNX computes."""
    if not path.exists():
        pytest.skip(f"{path} absent")
    if kind == "classifier":
        diff = ex.verify_onnxruntime(ex.load_onnx_classifier(path), path, "classifier", batches=(2,))
        tol = 1e-4
    else:
        diff = ex.verify_onnxruntime(ex.load_onnx_denoiser(path), path, "denoiser", batches=(2,))
        tol = 1e-5
    print(f"\n{kind}: max |ort(shipped) - torch(ours with shipped weights)| = {diff:.3g}")
    assert diff < tol


def test_reexported_shipped_denoiser_same_in_rust_runtime(diffshield_bin, tmp_path, small_bin):
    """Shipped denoiser_s weights re-exported by our exporter give the runtime's same figures."""
    data = TEST_BIN if TEST_BIN.exists() else small_bin
    src = REPO / "models" / "denoiser_s.onnx"
    out = ex.export_denoiser(ex.load_onnx_denoiser(src), tmp_path / "d.onnx")
    cand = make_candidate_dir(tmp_path / "models", denoisers={"s": str(out)})
    opts = ["--t-star", "60", "--stride", "20", "--batch", "8"]
    ours = runtime_eval(cand, data, 8, "s", opts, binary=diffshield_bin, timeout=300)
    ship = runtime_eval(REPO / "models", data, 8, "s", opts, binary=diffshield_bin, timeout=300)
    assert ours["purified_acc"] == ship["purified_acc"] and ours["clean_acc"] == ship["clean_acc"]


def test_rust_runtime_classifier_agrees_with_pytorch(tiny_models, diffshield_bin, small_bin):
    """The runtime's `eval --no-purify` accuracy of an exported classifier equals PyTorch's."""
    from training.data import load_cifar_bin
    from training.train_classifier import accuracy

    x, y = load_cifar_bin(small_bin, limit=32)
    want = accuracy(tiny_models["clf"], x, y, torch.device("cpu"))
    cand = make_candidate_dir(tiny_models["dir"] / "models_clf", classifier=str(tiny_models["clf_path"]))
    got = runtime_eval(cand, small_bin, 32, purify=False, binary=diffshield_bin, timeout=120)
    assert got["clean_acc"] == pytest.approx(want, abs=1e-9)
