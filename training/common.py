"""Shared training machinery: device and precision, EMA, budgets, checkpoints and logging."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_ctx(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (the card's recipe), plain fp32 on CPU (or with --precision fp32)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of parameters (buffers, e.g. BN statistics, are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        # warm-up as in common DDPM code: the average does not lag the first steps too far
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        ema_p = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_p[name].lerp_(p.detach(), 1.0 - d)
        ema_b = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_b[name].copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, s):
        self.decay = s["decay"]
        self.model.load_state_dict(s["model"])


class Budget:
    """Stops at --max-steps or after --max-minutes of wall time (this process)."""

    def __init__(self, max_steps: int | None, max_minutes: float | None):
        self.max_steps = max_steps
        self.deadline = None if not max_minutes else time.time() + 60.0 * max_minutes

    def done(self, step: int) -> bool:
        if self.max_steps is not None and step >= self.max_steps:
            return True
        return self.deadline is not None and time.time() >= self.deadline


def save_checkpoint(path: Path, **state) -> None:
    """Atomic torch.save (a crash never leaves a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


class Logger:
    """Loss lines on stdout and as JSON lines in OUT/log.jsonl."""

    def __init__(self, out_dir: Path, quiet: bool = False):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.f = open(out_dir / "log.jsonl", "a", buffering=1)
        self.quiet = quiet
        self.t0 = time.time()

    def log(self, **rec) -> None:
        rec = {"time_s": round(time.time() - self.t0, 2), **rec}
        self.f.write(json.dumps(rec) + "\n")
        if not self.quiet:
            print(" ".join(f"{k}={_fmt(v)}" for k, v in rec.items()), flush=True)

    def close(self):
        self.f.close()


def resume(which: str, ckpt_path: Path, device, model, ema, opt, stream, log) -> int:
    """Restores a training run from `which` ("auto": the run's last.pt; else a path) and
    returns its step. Model, EMA, optimiser, data stream and RNG states all come back, so a
    resumed run continues exactly as the uninterrupted one would have."""
    rp = ckpt_path if which == "auto" else Path(which)
    ck = load_checkpoint(rp, map_location=device)
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    stream.load_state(ck["stream"])
    torch.set_rng_state(ck["rng_cpu"].cpu())
    if device.type == "cuda" and ck.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ck["rng_cuda"].cpu())
    log.log(event="resume", step=ck["step"], checkpoint=str(rp))
    return ck["step"]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    p = min(1.0, (step - warmup) / (total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * p))


def describe_env(device) -> dict:
    d = {"torch": torch.__version__, "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d
