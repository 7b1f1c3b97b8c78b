"""The DDIM plan of the PyTorch peers (benches/whitebox_torch.py, benches/gpu_torch.py): the
shipped linear schedule in f64 and each step's coefficients, as src/schedule.rs computes them."""
import numpy as np


def plan(t_star=140, stride=10, eta=1.0):
    """(sqrt(abar[T*]), sqrt(1 - abar[T*]), steps): per step (t, sqrt(abar_t), sqrt(1 - abar_t),
    sqrt(abar_s), the eps coefficient sqrt(1 - abar_s - sigma^2), sigma)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    taus = list(range(t_star, 0, -stride)) + [0]
    steps = []
    for t, s in zip(taus[:-1], taus[1:]):
        sigma = eta * np.sqrt((1 - abar[s]) / (1 - abar[t])) * np.sqrt(1 - abar[t] / abar[s])
        steps.append((t, np.sqrt(abar[t]), np.sqrt(1 - abar[t]), np.sqrt(abar[s]),
                      np.sqrt(max(0.0, 1 - abar[s] - sigma ** 2)), sigma))
    return np.sqrt(abar[t_star]), np.sqrt(1 - abar[t_star]), steps
