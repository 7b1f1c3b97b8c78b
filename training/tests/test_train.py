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
