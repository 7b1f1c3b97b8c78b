"""The diffusion convention of models/MODEL_CARD.md, exactly.

- beta_s = linspace(1e-4, 0.02, 1000)[s-1], s = 1..1000; abar(0) = 1, abar(t) = prod_{s<=t}(1-beta_s)
  computed in float64 (index t of `abar_table()` is abar(t), so the table has 1001 entries).
- The denoiser's `t` input is the 1-based integer step passed as float32.
- Image space: x0 = 2*image - 1; x_t = sqrt(abar(t)) x0 + sqrt(1-abar(t)) eps.
- Training draws t uniformly from the integers [t_min, t_max] (the card: [1, 500]).
"""
from __future__ import annotations

import math

import numpy as np

BETA_START = 1e-4
BETA_END = 0.02
STEPS = 1000
TRAINED_T = (1, 500)


def abar_table(steps: int = STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END) -> np.ndarray:
    """float64 [steps+1]: abar(0) = 1, abar(t) = prod_{s=1..t}(1 - beta_s)."""
    betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


class Schedule:
    """Per-t coefficients as torch tensors (float64 master copy, cast on use)."""

    def __init__(self, device="cpu"):
        import torch

        ab = abar_table()
        self.abar64 = ab
        self.sqrt_ab = torch.tensor(np.sqrt(ab), dtype=torch.float64, device=device)
        self.sqrt_1m_ab = torch.tensor(np.sqrt(1.0 - ab), dtype=torch.float64, device=device)

    def coeffs(self, t, dtype):
        """t: int64 tensor [N] -> (sqrt(abar(t)), sqrt(1-abar(t))) as [N,1,1,1] in `dtype`."""
        a = self.sqrt_ab[t].to(dtype)[:, None, None, None]
        b = self.sqrt_1m_ab[t].to(dtype)[:, None, None, None]
        return a, b

    def q_sample(self, x0, t, eps):
        a, b = self.coeffs(t, x0.dtype)
        return a * x0 + b * eps

    def x0_from_eps(self, x_t, t, eps, clip: bool = True):
        a, b = self.coeffs(t, x_t.dtype)
        x0 = (x_t - b * eps) / a
        return x0.clamp(-1.0, 1.0) if clip else x0


def sample_t(n: int, t_min: int, t_max: int, device, generator=None):
    """Integer t ~ U{t_min..t_max} (inclusive), int64 [n]."""
    import torch

    return torch.randint(t_min, t_max + 1, (n,), device=device, generator=generator)


def to_diffusion_space(img01):
    return img01 * 2.0 - 1.0


def psnr(a01, b01) -> float:
    """PSNR in dB of two [0,1] arrays (whole-batch MSE)."""
    mse = float(np.mean((np.asarray(a01, np.float64) - np.asarray(b01, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
