"""Train an eps-prediction UNet (denoiser_s / denoiser_m) on the CIFAR-10 JPEG pack.

Recipe (models/MODEL_CARD.md): AdamW lr 2e-4, batch 256, MSE on eps, EMA 0.9995, t ~ U{1..500},
horizontal flip, bf16 autocast on a GPU (fp32 on CPU). One process per model:

    python -m training.train_denoiser --size m --data ../shared/data/cifar10_train_jpeg.pack \
        --out training/runs/den_m --max-minutes 240 --export
    python -m training.train_denoiser --size m --out training/runs/den_m --resume   # continue

Writes OUT/last.pt every --ckpt-every steps and at the end, OUT/log.jsonl, and with --export
OUT/denoiser_<size>.onnx (EMA weights), checked for portability and against onnxruntime; it
prints the models.toml table for it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common, data, diffusion
from .models import DENOISER_SIZES, UNet, count_params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="m", help="s (base 32), m (base 64) or an integer base width")
    ap.add_argument("--data", default="../shared/data/cifar10_train_jpeg.pack",
                    help="JPEG pack (or a CIFAR-10 .bin) with the training images")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--cache-dir", default=None, help="cache the decoded pack here (.npz)")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, log, exported ONNX)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps")
    ap.add_argument("--lr-schedule", choices=["const", "cosine"], default="const")
    ap.add_argument("--total-steps", type=int, default=None,
                    help="length of the cosine schedule (default: --max-steps)")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--init-from", default=None,
                    help="start from the weights of a denoiser ONNX file of this layout (e.g. the "
                         "shipped models/denoiser_m.onnx, to fine-tune it) or of a checkpoint")
    ap.add_argument("--t-min", type=int, default=diffusion.TRAINED_T[0])
    ap.add_argument("--t-max", type=int, default=diffusion.TRAINED_T[1],
                    help="trained t range (recorded in the ONNX metadata and the manifest)")
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--resume", nargs="?", const="auto", default=None,
                    help="continue from OUT/last.pt (or the given checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--export", action="store_true", help="export the EMA model to ONNX at the end")
    ap.add_argument("--quiet", action="store_true")
    return ap


def _base(size: str) -> int:
    return DENOISER_SIZES[size] if size in DENOISER_SIZES else int(size)


def probe_loss(model, x0, t, eps, sched, device, precision) -> float:
    """MSE on a fixed (x0, t, eps) set: a noise-free view of training progress."""
    was = model.training
    model.eval()
    with torch.no_grad(), common.autocast_ctx(device, precision):
        pred = model(sched.q_sample(x0, t, eps), t.float())
    model.train(was)
    return float(F.mse_loss(pred.float(), eps))


def train(args) -> dict:
    if args.t_min < 1 or args.t_max > diffusion.STEPS or args.t_min > args.t_max:
        raise SystemExit(f"bad t range [{args.t_min}, {args.t_max}]")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    log = common.Logger(out, quiet=args.quiet)

    images, labels = data.load_images(args.data, limit=args.limit, cache_dir=args.cache_dir)
    stream = data.BatchStream(images, labels, args.batch, args.seed, device)
    sched = diffusion.Schedule(device)

    model = UNet(base=_base(str(args.size)), dropout=args.dropout)
    if args.init_from and not args.resume:
        if str(args.init_from).endswith(".onnx"):
            from .export_onnx import load_onnx_denoiser

            src = load_onnx_denoiser(args.init_from)
        else:
            src = load_denoiser_checkpoint(args.init_from)
        if src.base != model.base:
            raise SystemExit(f"--init-from has base width {src.base}, --size gives {model.base}")
        model.load_state_dict(src.state_dict())
    model = model.to(device)
    ema = common.EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    ckpt_path = out / "last.pt"
    if args.resume:
        step = common.resume(args.resume, ckpt_path, device, model, ema, opt, stream, log)
    fwd = torch.compile(model) if args.compile else model

    # fixed probe set: up to 256 training images, spread over the t range, fixed noise
    g = torch.Generator().manual_seed(1234)
    n_probe = min(256, stream.n)
    px = diffusion.to_diffusion_space(data.to_unit(torch.as_tensor(images[:n_probe]))).to(device)
    pt = torch.linspace(args.t_min, args.t_max, n_probe).round().long().to(device)
    pe = torch.randn(px.shape, generator=g).to(device)

    log.log(event="start", params=count_params(model), base=model.base, images=stream.n,
            t_range=[args.t_min, args.t_max], **common.describe_env(device),
            args={k: v for k, v in vars(args).items()})
    budget = common.Budget(args.max_steps, args.max_minutes)
    total = args.total_steps or args.max_steps or 100_000
    first_probe = probe_loss(model, px, pt, pe, sched, device, args.precision)
    log.log(step=step, probe_loss=first_probe)
    losses, run_loss, t_last = [], 0.0, time.time()
    model.train()
    while not budget.done(step):
        xb, _ = stream.next()
        x = data.to_unit(xb)
        if not args.no_flip:
            x = data.random_flip(x)
        x0 = diffusion.to_diffusion_space(x)
        t = diffusion.sample_t(x0.shape[0], args.t_min, args.t_max, device)
        eps = torch.randn_like(x0)
        x_t = sched.q_sample(x0, t, eps)
        lr = (common.cosine_lr(step, total, args.lr, args.warmup) if args.lr_schedule == "cosine"
              else args.lr * min(1.0, (step + 1) / max(1, args.warmup)))
        for gp in opt.param_groups:
            gp["lr"] = lr
        with common.autocast_ctx(device, args.precision):
            pred = fwd(x_t, t.float())
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        lv = loss.detach().item()
        losses.append(lv)
        run_loss += lv
        if step % args.log_every == 0:
            dt = time.time() - t_last
            log.log(step=step, loss=run_loss / args.log_every, lr=lr,
                    img_per_s=round(args.log_every * stream.bs / max(dt, 1e-9), 1))
            run_loss, t_last = 0.0, time.time()
        if args.ckpt_every and step % args.ckpt_every == 0:
            _save(ckpt_path, model, ema, opt, stream, step, args, device)
    _save(ckpt_path, model, ema, opt, stream, step, args, device)
    last_probe = probe_loss(model, px, pt, pe, sched, device, args.precision)
    ema_probe = probe_loss(ema.model, px, pt, pe, sched, device, args.precision)
    log.log(event="end", step=step, probe_loss=last_probe, ema_probe_loss=ema_probe)
    result = {"steps": step, "probe_first": first_probe, "probe_last": last_probe,
              "probe_ema": ema_probe, "losses": losses, "checkpoint": str(ckpt_path)}
    if args.export:
        result.update(export_run(ema.model, out, str(args.size), (args.t_min, args.t_max), step))
    log.close()
    return result


def _save(path, model, ema, opt, stream, step, args, device):
    common.save_checkpoint(
        path, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
        stream=stream.state(), step=step, args=vars(args), unet_config=model.config,
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def export_run(model, out: Path, size: str, trained_t, step: int) -> dict:
    """EMA weights -> OUT/denoiser_<size>.onnx, checked; prints the manifest table."""
    from .export_onnx import export_denoiser, manifest_snippet, verify_onnxruntime

    tier = size if size in DENOISER_SIZES else f"b{size}"
    path = out / f"denoiser_{tier}.onnx"
    model = model.float().cpu().eval()
    export_denoiser(model, path, trained_t, extra_meta={"train_steps": step, "weights": "ema"})
    diff = verify_onnxruntime(model, path, "denoiser")
    print(f"exported {path}; max |onnxruntime - pytorch| = {diff:.3g}")
    print("models.toml table:\n" + manifest_snippet("denoiser", path.name, tier, trained_t))
    return {"onnx": str(path), "ort_max_abs_diff": diff}


def load_denoiser_checkpoint(path, use_ema: bool = True) -> UNet:
    ck = common.load_checkpoint(Path(path))
    cfg = ck["unet_config"]
    model = UNet(base=cfg["base"], mults=cfg["mults"], num_res=cfg["num_res"],
                 attn_levels=cfg["attn_levels"], dropout=cfg.get("dropout", 0.0))
    model.load_state_dict(ck["ema"]["model"] if use_ema else ck["model"])
    return model.eval()


def main(argv=None):
    args = build_parser().parse_args(argv)
    res = train(args)
    res.pop("losses")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
