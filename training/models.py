"""The two architectures, laid out like the shipped ONNX files (models/*.onnx).

Classifier (models/classifier.onnx, 6 570 886 parameters incl. mean/std):
  ResNet-9 (Page's DAWNBench net): (x - mean)/std, conv-BN-ReLU 64, 128 + maxpool,
  residual(128), 256 + maxpool, 512 + maxpool, residual(512), maxpool 4, flatten,
  linear 512->10 without bias, times 0.125. Trained with BatchNorm; `ClassifierExport` is the
  same net with BN folded into the convs (module names as in the shipped graph: net.0.0 conv,
  net.0.1 relu, net.3.a.0, ..., net.11 linear).

Denoiser (models/denoiser_{s,m}.onnx, s: base 32 = 1 624 323 params, m: base 64 = 6 472 195):
  DDPM-style eps-prediction UNet, channel mults (1,2,2), 2 res blocks per level (3 on the way up),
  self-attention (one head, GroupNorm first) at 16x16 and in the middle (8x8), GroupNorm with
  min(32, C/4) groups, eps 1e-5, SiLU, sinusoidal time embedding of width `base`
  (freqs exp(-ln(1e4) i/(half-1))) then Linear(base,4base)-SiLU-Linear(4base,4base); every res
  block adds Linear(SiLU(temb)) to its first conv. Down-sampling: 3x3 conv stride 2;
  up-sampling: nearest x2 then 3x3 conv. Module names (temb.0, conv_in, down.K.J, mid.K, up.K.J,
  n_out, conv_out) are those of the shipped graph, so a shipped-size export has the same
  parameter count and tensor names.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


# ---------------------------------------------------------------------------------------------
# Export-friendly building blocks


class StaticShapeMixin:
    """Modules whose export path needs the spatial size as Python ints.

    `freeze_static_shapes(model, *example)` records the input shape of every such module with a
    forward pre-hook; in export mode they then reshape with constants (-1 only for the batch), so
    the ONNX graph has no Shape/Gather computation.
    """

    static_hw: tuple[int, int] | None = None
    export_mode: bool = False


class GroupNorm(nn.GroupNorm, StaticShapeMixin):
    """nn.GroupNorm (fused kernel) for training; written out in basic ops for export:
    Reshape [-1, G, C/G*H*W] -> ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div -> Reshape -> Mul/Add,
    the same op sequence as the shipped denoisers."""

    def forward(self, x):
        if not self.export_mode:
            return super().forward(x)
        c, g = self.num_channels, self.num_groups
        h, w = self.static_hw
        y = x.reshape(-1, g, (c // g) * h * w)
        mean = y.mean(dim=2, keepdim=True)
        d = y - mean
        var = (d * d).mean(dim=2, keepdim=True)
        y = d / torch.sqrt(var + self.eps)
        y = y.reshape(-1, c, h, w)
        return y * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)


def groups_for(c: int) -> int:
    return min(32, c // 4)


def norm(c: int) -> GroupNorm:
    return GroupNorm(groups_for(c), c, eps=1e-5)


def freeze_static_shapes(model: nn.Module, *example) -> None:
    """Runs `model(*example)` once, recording each StaticShapeMixin module's input H, W."""
    hooks = []

    def pre(mod, args):
        mod.static_hw = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    for m in model.modules():
        if isinstance(m, StaticShapeMixin):
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()


def set_export_mode(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, StaticShapeMixin):
            if on and m.static_hw is None:
                raise RuntimeError("call freeze_static_shapes before export mode")
            m.export_mode = on


# ---------------------------------------------------------------------------------------------
# Classifier


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int, block=conv_bn):
        super().__init__()
        self.a = block(c, c)
        self.b = block(c, c)

    def forward(self, x):
        return x + self.b(self.a(x))


def _resnet9_layers(block, widths=(64, 128, 256, 512)):
    w0, w1, w2, w3 = widths
    return [
        block(3, w0),                       # net.0
        block(w0, w1),                      # net.1
        nn.MaxPool2d(2),                    # net.2
        Residual(w1, block),                # net.3
        block(w1, w2),                      # net.4
        nn.MaxPool2d(2),                    # net.5
        block(w2, w3),                      # net.6
        nn.MaxPool2d(2),                    # net.7
        Residual(w3, block),                # net.8
        nn.MaxPool2d(4),                    # net.9
        nn.Flatten(),                       # net.10
        nn.Linear(w3, 10, bias=False),      # net.11
    ]


class Classifier(nn.Module):
    """ResNet-9 with BatchNorm; input RGB in [0,1], normalises inside; logits = 0.125 * linear."""

    def __init__(self, widths=(64, 128, 256, 512), scale: float = 0.125):
        super().__init__()
        self.widths = tuple(widths)
        self.scale = scale
        self.register_buffer("mean", torch.tensor(MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).reshape(1, 3, 1, 1))
        self.net = nn.Sequential(*_resnet9_layers(conv_bn, self.widths))

    def forward(self, image):
        return self.net((image - self.mean) / self.std) * self.scale


def conv_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=True), nn.ReLU(inplace=True))


class ClassifierExport(nn.Module):
    """The deployed form: BN folded into conv weights and bias (as models/classifier.onnx)."""

    def __init__(self, src: Classifier):
        super().__init__()
        self.scale = src.scale
        self.register_buffer("mean", src.mean.clone())
        self.register_buffer("std", src.std.clone())
        self.net = nn.Sequential(*_resnet9_layers(conv_relu, src.widths))
        src_blocks = [m for m in src.net.modules() if isinstance(m, nn.Sequential) and len(m) == 3]
        dst_blocks = [m for m in self.net.modules() if isinstance(m, nn.Sequential) and len(m) == 2]
        assert len(src_blocks) == len(dst_blocks) == 8
        with torch.no_grad():
            for s, d in zip(src_blocks, dst_blocks):
                conv, bn = s[0], s[1]
                k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                d[0].weight.copy_(conv.weight * k[:, None, None, None])
                d[0].bias.copy_(bn.bias - bn.running_mean * k)
            self.net[11].weight.copy_(src.net[11].weight)
        self.eval()

    def forward(self, image):
        return self.net((image - self.mean) / self.std) * self.scale


# ---------------------------------------------------------------------------------------------
# Denoiser UNet


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding [N, dim] = [sin(t f), cos(t f)], f_i = exp(-ln(1e4) i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float().unsqueeze(1) * freqs.to(t.device).unsqueeze(0)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, dropout: float = 0.0):
        super().__init__()
        self.n1 = norm(cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(tdim, cout)
        self.n2 = norm(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t(F.silu(temb))[:, :, None, None]
        h = self.c2(self.drop(F.silu(self.n2(h))))
        return self.skip(x) + h


class Attention(nn.Module, StaticShapeMixin):
    """Single-head self-attention over H*W positions; constant reshapes in export mode."""

    def __init__(self, c: int):
        super().__init__()
        self.n = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.scale = c ** -0.5

    def forward(self, x):
        c = self.qkv.in_channels
        if self.export_mode:
            h, w = self.static_hw
        else:
            h, w = x.shape[-2], x.shape[-1]
        # [N, 3C, HW] split into q, k, v of [N, C, HW] (Reshape + Split; no Squeeze, whose
        # export with a dynamic batch would add Shape/If nodes)
        qkv = self.qkv(self.n(x)).reshape(-1, 3 * c, h * w)
        q, k, v = torch.split(qkv, c, dim=1)
        if self.export_mode:
            attn = torch.softmax(torch.matmul(q.transpose(1, 2), k) * self.scale, dim=-1)
            out = torch.matmul(v, attn.transpose(1, 2))            # [N, C, HW]
        else:  # same maths, fused kernel (flash / memory-efficient attention on GPU)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale
            ).transpose(1, 2)
        return x + self.proj(out.reshape(-1, c, h, w))


class UNet(nn.Module):
    """eps-prediction UNet; forward(x_t [N,3,H,W] in [-1,1], t [N] float) -> eps."""

    def __init__(self, base: int = 64, mults=(1, 2, 2), num_res: int = 2, attn_levels=(1,),
                 dropout: float = 0.0):
        super().__init__()
        self.config = dict(base=base, mults=tuple(mults), num_res=num_res,
                           attn_levels=tuple(attn_levels), dropout=dropout)
        tdim = 4 * base
        self.base = base
        self.temb = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(3, base, 3, padding=1)
        chans = [base * m for m in mults]
        self.down = nn.ModuleList()
        skips = [base]
        ch = base
        for lvl, cout in enumerate(chans):
            for _ in range(num_res):
                layers = [ResBlock(ch, cout, tdim, dropout)]
                ch = cout
                if lvl in attn_levels:
                    layers.append(Attention(ch))
                self.down.append(nn.Sequential(*layers))
                skips.append(ch)
            if lvl != len(chans) - 1:
                self.down.append(nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, tdim, dropout), Attention(ch),
                                  ResBlock(ch, ch, tdim, dropout)])
        self.up = nn.ModuleList()
        self._is_upsample = []
        for lvl in reversed(range(len(chans))):
            cout = chans[lvl]
            for _ in range(num_res + 1):
                layers = [ResBlock(ch + skips.pop(), cout, tdim, dropout)]
                ch = cout
                if lvl in attn_levels:
                    layers.append(Attention(ch))
                self.up.append(nn.Sequential(*layers))
                self._is_upsample.append(False)
            if lvl != 0:
                self.up.append(nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1)))
                self._is_upsample.append(True)
        assert not skips
        self.n_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    @staticmethod
    def _run(seq, h, temb):
        for layer in seq:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x_t, t):
        temb = self.temb(timestep_embedding(t, self.base))
        h = self.conv_in(x_t)
        hs = [h]
        for seq in self.down:
            h = self._run(seq, h, temb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for seq, is_up in zip(self.up, self._is_upsample):
            if is_up:
                h = seq(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = self._run(seq, torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.n_out(h)))


DENOISER_SIZES = {"s": 32, "m": 64}


def make_denoiser(size: str | int, dropout: float = 0.0) -> UNet:
    base = DENOISER_SIZES[size] if isinstance(size, str) else int(size)
    return UNet(base=base, dropout=dropout)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
