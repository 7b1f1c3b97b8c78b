"""A few training steps on a tiny slice decrease the loss (both networks, tiny widths)."""
import torch

from training import train_classifier, train_denoiser


def _den_args(out, data, **kw):
    argv = ["--size", "8", "--data", str(data), "--limit", "32", "--batch", "8", "--lr", "2e-3",
            "--warmup", "1", "--max-steps", "25", "--log-every", "5", "--ckpt-every", "0",
            "--out", str(out), "--ema", "0.9", "--threads", "1", "--quiet"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return train_denoiser.build_parser().parse_args(argv)


def _clf_args(out, data, steps=30, extra=()):
    argv = ["--widths", "8,16,32,64", "--data", str(data), "--limit", "32", "--batch", "16",
            "--lr", "0.05", "--max-steps", str(steps), "--log-every", "5", "--ckpt-every", "0",
            "--out", str(out), "--threads", "1", "--no-augment", "--label-smoothing", "0",
            "--quiet", *extra]
    return train_classifier.build_parser().parse_args(argv)


def test_denoiser_loss_decreases(tmp_path, small_bin):
    res = train_denoiser.train(_den_args(tmp_path / "den", small_bin))
    print(f"\ndenoiser probe loss {res['probe_first']:.4f} -> {res['probe_last']:.4f} "
          f"(EMA {res['probe_ema']:.4f}); first 5 steps {sum(res['losses'][:5]) / 5:.4f}, "
          f"last 5 {sum(res['losses'][-5:]) / 5:.4f}")
    assert res["steps"] == 25
    assert res["probe_last"] < 0.7 * res["probe_first"]
    assert (tmp_path / "den" / "last.pt").exists() and (tmp_path / "den" / "log.jsonl").exists()


def test_denoiser_t_range_recorded(tmp_path, small_bin):
    args = _den_args(tmp_path / "den", small_bin, max_steps=2, t_min=1, t_max=200)
    args.export = True
    res = train_denoiser.train(args)
    from training.export_onnx import read_metadata

    assert read_metadata(res["onnx"])["trained_t"] == [1, 200]
    assert res["ort_max_abs_diff"] < 1e-5


def test_classifier_loss_decreases(tmp_path, small_bin):
    res = train_classifier.train(_clf_args(tmp_path / "clf", small_bin))
    print(f"\nclassifier probe loss {res['probe_first']:.4f} -> {res['probe_last']:.4f}; "
          f"first 5 steps {sum(res['losses'][:5]) / 5:.4f}, last 5 {sum(res['losses'][-5:]) / 5:.4f}")
    assert res["probe_last"] < 0.7 * res["probe_first"]


def test_classifier_resume_is_exact(tmp_path, small_bin):
    """8 steps in one go == 4 steps, then --resume to 8 (same data order, RNG, optimizer, EMA)."""
    full = train_classifier.train(_clf_args(tmp_path / "a", small_bin, 8, ["--total-steps", "8"]))
    part = train_classifier.train(_clf_args(tmp_path / "b", small_bin, 4, ["--total-steps", "8"]))
    rest = train_classifier.train(_clf_args(tmp_path / "b", small_bin, 8,
                                            ["--total-steps", "8", "--resume"]))
    assert part["steps"] == 4 and rest["steps"] == 8
    ca = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for k, v in ca["model"].items():
        assert torch.allclose(v.float(), cb["model"][k].float(), atol=1e-6), k
    for k, v in ca["ema"]["model"].items():
        assert torch.allclose(v.float(), cb["ema"]["model"][k].float(), atol=1e-6), k
    assert full["losses"][4:] == rest["losses"]


def test_budget():
    import time

    from training.common import Budget

    assert Budget(3, None).done(3) and not Budget(3, None).done(2)
    b = Budget(None, 0.5 / 60000)  # half a millisecond
    time.sleep(0.01)
    assert b.done(0)
    assert not Budget(None, None).done(10**9)


def _purified_set(d, images, labels, draws=2, per=24):
    """A folder in `diffshield purify-set`'s layout: each image `draws` times (a little noise)."""
    import json

    import numpy as np

    from training.data import PURIFIED_SET_FORMAT, write_cifar_bin

    d.mkdir()
    rng = np.random.default_rng(1)
    n = len(images)
    rep = np.repeat(images, draws, axis=0).astype(np.int16)
    rep = np.clip(rep + rng.integers(-3, 4, rep.shape), 0, 255).astype(np.uint8)
    lab = np.repeat(labels, draws)
    for k in range((n + per - 1) // per):
        sl = slice(k * per * draws, min(n, (k + 1) * per) * draws)
        write_cifar_bin(d / f"shard_{k:05d}.bin", rep[sl], lab[sl])
    (d / "manifest.json").write_text(json.dumps({
        "format": PURIFIED_SET_FORMAT, "images": n, "draws": draws, "shard_images": per}))
    return d


def test_purified_set_loads_every_draw_and_refuses_an_unfinished_one(tmp_path, small_bin):
    import pytest

    from training.data import load_cifar_bin, load_images

    x, y = load_cifar_bin(small_bin, limit=50)
    d = _purified_set(tmp_path / "set", x, y)
    px, py = load_images(d)
    assert px.shape == (100, 3, 32, 32) and list(py[:6]) == [y[0], y[0], y[1], y[1], y[2], y[2]]
    assert load_images(d, limit=30)[0].shape[0] == 60
    (d / "shard_00002.bin").write_bytes(b"\0" * 3073)
    with pytest.raises(ValueError, match="incomplete"):
        load_images(d)
    assert load_images(d, limit=48)[0].shape[0] == 96


def test_fine_tuning_starts_from_the_onnx_weights_resumes_and_exports(tmp_path, small_bin):
    """--init-onnx: the first loss is the exported model's (not a random one's), the folded
    model trains, resumes exactly and exports."""
    from training.data import load_cifar_bin
    from training.export_onnx import load_onnx_classifier

    base = train_classifier.train(_clf_args(tmp_path / "base", small_bin, 40, ["--export"]))
    x, y = load_cifar_bin(small_bin, limit=32)
    d = _purified_set(tmp_path / "set", x, y)
    extra = ["--init-onnx", base["onnx"], "--lr", "0.01", "--total-steps", "8"]
    full = train_classifier.train(_clf_args(tmp_path / "ft", d, 8, extra))
    from training.data import load_images, to_unit

    px, py = load_images(d)
    start = train_classifier.probe_loss(load_onnx_classifier(base["onnx"]),
                                        to_unit(torch.as_tensor(px)), torch.as_tensor(py))
    assert abs(full["probe_first"] - start) < 1e-4, (full["probe_first"], start)
    part = train_classifier.train(_clf_args(tmp_path / "ft2", d, 4, extra))
    rest = train_classifier.train(_clf_args(tmp_path / "ft2", d, 8, [*extra, "--resume"]))
    assert full["losses"][4:] == rest["losses"] and part["steps"] == 4
    ck = train_classifier.load_classifier_checkpoint(tmp_path / "ft" / "last.pt", use_ema=False)
    onnx = train_classifier.export_run(ck, tmp_path / "ft", 8)
    assert onnx["ort_max_abs_diff"] < 1e-4
    again = load_onnx_classifier(onnx["onnx"])
    xb = torch.rand(4, 3, 32, 32)
    assert torch.allclose(again(xb), ck(xb), atol=1e-4)
