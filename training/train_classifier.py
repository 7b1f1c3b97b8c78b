"""Train the ResNet-9 classifier on the CIFAR-10 JPEG pack.

Recipe (models/MODEL_CARD.md): SGD with Nesterov momentum, one-cycle LR, label smoothing 0.2,
random crop (reflect pad 4) + horizontal flip, 58 epochs, bf16 autocast on a GPU (fp32 on CPU);
here also EMA weights (evaluated and exported) and optional cutout.

    python -m training.train_classifier --data ../shared/data/cifar10_train_jpeg.pack \
        --test ../shared/data/cifar10_test_2000.bin --out training/runs/clf --export

Fine-tuning on purified images (issue 18; training/README.md): --init-onnx models/classifier.onnx
--data DIR, where DIR is a `diffshield purify-set` folder (every draw of every image).

Writes OUT/last.pt every --ckpt-every steps and at the end (continue with --resume),
OUT/log.jsonl, and with --export OUT/classifier.onnx (EMA weights, BN folded), checked for
portability and against onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common, data
from .models import Classifier, count_params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10_train_jpeg.pack")
    ap.add_argument("--test", default=None, help="CIFAR-10 .bin evaluated at every epoch end / the end")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", default="64,128,256,512", help="channel widths (shipped: 64,128,256,512)")
    ap.add_argument("--init-onnx", default=None,
                    help="start from this classifier ONNX file (BN folded, e.g. models/classifier.onnx) "
                         "instead of random weights: fine-tuning; --widths is then the file's")
    ap.add_argument("--epochs", type=float, default=58)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.2, help="one-cycle peak LR")
    ap.add_argument("--pct-start", type=float, default=0.25, help="fraction of steps rising to the peak")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.2)
    ap.add_argument("--cutout", type=int, default=0, help="cutout square size (0 = off)")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--total-steps", type=int, default=None,
                    help="one-cycle schedule length (default: --epochs, or --max-steps if shorter)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--resume", nargs="?", const="auto", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format (GPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    return ap


def one_cycle(step: int, total: int, peak: float, pct: float) -> float:
    """Linear 0.04*peak -> peak over pct of the steps, then linear to 0 (Page's schedule)."""
    up = max(1, int(total * pct))
    if step < up:
        return peak * (0.04 + 0.96 * step / up)
    return peak * max(0.0, (total - step) / max(1, total - up))


@torch.no_grad()
def accuracy(model, images_u8, labels, device, precision="auto", batch=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images_u8), batch):
        x = data.to_unit(torch.as_tensor(images_u8[i:i + batch]).to(device))
        with common.autocast_ctx(device, precision):
            logits = model(x)
        correct += int((logits.float().argmax(1).cpu() == torch.as_tensor(labels[i:i + batch])).sum())
    return correct / len(images_u8)


def probe_loss(model, x, y) -> float:
    """Cross-entropy (no smoothing) on a fixed batch in train mode, BN statistics left untouched."""
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    was = model.training
    model.train()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x).float(), y))
    model.load_state_dict({**model.state_dict(), **bufs})
    model.train(was)
    return loss


def train(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    log = common.Logger(out, quiet=args.quiet)
    images, labels = data.load_images(args.data, limit=args.limit, cache_dir=args.cache_dir)
    stream = data.BatchStream(images, labels, args.batch, args.seed, device)
    test = data.load_cifar_bin(args.test) if args.test else None
    steps_per_epoch = max(1, stream.n // stream.bs)
    # schedule length: --total-steps, else --epochs (shortened to --max-steps for smoke runs)
    total = int(math.ceil(args.epochs * steps_per_epoch))
    if args.total_steps:
        total = args.total_steps
    elif args.max_steps:
        total = min(total, args.max_steps)

    if args.init_onnx:
        from .export_onnx import load_onnx_classifier

        # The deployed form has no BatchNorm (folded into the convs): fine-tuning trains it as is.
        model = load_onnx_classifier(args.init_onnx).to(device)
        widths = tuple(int(model.net[i][0].weight.shape[0]) for i in (0, 1, 4, 6))
    else:
        widths = tuple(int(w) for w in args.widths.split(","))
        model = Classifier(widths=widths).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = common.EMA(model, args.ema)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=args.momentum, nesterov=True)
    step = 0
    ckpt_path = out / "last.pt"
    if args.resume:
        step = common.resume(args.resume, ckpt_path, device, model, ema, opt, stream, log)
    fwd = torch.compile(model) if args.compile else model

    n_probe = min(256, stream.n)
    px = data.to_unit(torch.as_tensor(images[:n_probe]).to(device))
    py = torch.as_tensor(labels[:n_probe]).to(device)
    log.log(event="start", params=count_params(model), images=stream.n, total_steps=total,
            **common.describe_env(device), args=vars(args))
    first_probe = probe_loss(model, px, py)
    log.log(step=step, probe_loss=first_probe)
    budget = common.Budget(args.max_steps, args.max_minutes)
    losses, run_loss, t_last = [], 0.0, time.time()
    epoch_seen = stream.epoch
    model.train()
    while step < total and not budget.done(step):
        xb, yb = stream.next()
        x = data.to_unit(xb)
        if not args.no_augment:
            x = data.random_flip(data.random_crop(x, 4))
            if args.cutout:
                x = data.cutout(x, args.cutout)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = one_cycle(step, total, args.lr, args.pct_start)
        for gp in opt.param_groups:
            gp["lr"] = lr
        with common.autocast_ctx(device, args.precision):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        step += 1
        lv = loss.detach().item()
        losses.append(lv)
        run_loss += lv
        if step % args.log_every == 0:
            dt = time.time() - t_last
            log.log(step=step, epoch=round(step / steps_per_epoch, 2), loss=run_loss / args.log_every,
                    lr=lr, img_per_s=round(args.log_every * stream.bs / max(dt, 1e-9), 1))
            run_loss, t_last = 0.0, time.time()
        if test is not None and stream.epoch != epoch_seen:
            epoch_seen = stream.epoch
            log.log(step=step, epoch=stream.epoch,
                    test_acc=accuracy(model, *test, device, args.precision),
                    test_acc_ema=accuracy(ema.model, *test, device, args.precision))
            model.train()
        if args.ckpt_every and step % args.ckpt_every == 0:
            _save(ckpt_path, model, ema, opt, stream, step, args, device, widths)
    _save(ckpt_path, model, ema, opt, stream, step, args, device, widths)
    last_probe = probe_loss(model, px, py)
    res = {"steps": step, "probe_first": first_probe, "probe_last": last_probe, "losses": losses,
           "checkpoint": str(ckpt_path)}
    if test is not None:
        res["test_acc"] = accuracy(model, *test, device, args.precision)
        res["test_acc_ema"] = accuracy(ema.model, *test, device, args.precision)
    log.log(event="end", **{k: v for k, v in res.items() if k != "losses"})
    if args.export:
        res.update(export_run(ema.model, out, step))
    log.close()
    return res


def _save(path, model, ema, opt, stream, step, args, device, widths):
    common.save_checkpoint(
        path, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
        stream=stream.state(), step=step, args=vars(args), widths=list(widths),
        folded=bool(args.init_onnx),
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def export_run(model, out: Path, step: int) -> dict:
    from .export_onnx import export_classifier, manifest_snippet, verify_onnxruntime

    path = out / "classifier.onnx"
    model = model.float().cpu().eval().to(memory_format=torch.contiguous_format)
    export_classifier(model, path, extra_meta={"train_steps": step, "weights": "ema"})
    diff = verify_onnxruntime(model, path, "classifier")
    print(f"exported {path}; max |onnxruntime - pytorch| = {diff:.3g}")
    print("models.toml table:\n" + manifest_snippet("classifier", path.name))
    return {"onnx": str(path), "ort_max_abs_diff": diff}


def load_classifier_checkpoint(path, use_ema: bool = True) -> Classifier:
    ck = common.load_checkpoint(Path(path))
    model = Classifier(widths=tuple(ck["widths"]))
    if ck.get("folded"):
        from .models import ClassifierExport

        model = ClassifierExport(model)
    model.load_state_dict(ck["ema"]["model"] if use_ema else ck["model"])
    return model.eval()


def main(argv=None):
    args = build_parser().parse_args(argv)
    res = train(args)
    res.pop("losses")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
