"""What the benchmark measures: reconstruction PSNR/SSIM, error of the inverted noise,
the noise's statistics, wall time and peak memory."""
from __future__ import annotations

import math
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float, clamp=None) -> float:
    """PSNR in dB (inf for identical inputs, 0 for non-finite ones); ``clamp`` = (lo, hi)
    clips both first (pixels are displayed clipped)."""
    if not finite(x):
        return 0.0
    x, ref = x.double(), ref.double()
    if clamp is not None:
        x, ref = x.clamp(*clamp), ref.clamp(*clamp)
    mse = float((x - ref).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float, clamp=None) -> float:
    """Mean SSIM (scikit-image, 7x7 windows, channels averaged) of the first batch element."""
    if not finite(x):
        return 0.0
    from skimage.metrics import structural_similarity
    x, ref = x.double(), ref.double()
    if clamp is not None:
        x, ref = x.clamp(*clamp), ref.clamp(*clamp)
    a, b = x[0].cpu().numpy(), ref[0].cpu().numpy()
    win = min(7, a.shape[-1], a.shape[-2])
    win -= (win + 1) % 2
    return float(structural_similarity(a, b, data_range=data_range, channel_axis=0, win_size=win))


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (inf when x is not finite)."""
    if not finite(x):
        return float("inf")
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def noise_stats(eps: torch.Tensor) -> dict:
    """Is it still Gaussian noise? std, excess kurtosis and the lag-1 spatial
    autocorrelation (mean of horizontal and vertical, per channel) of a (B, C, H, W)
    tensor, which should be ~1, ~0 and ~0."""
    if not finite(eps):
        return {"std": float("nan"), "kurtosis": float("nan"), "autocorr": float("nan")}
    e = eps.double()
    c = e - e.mean(dim=(-2, -1), keepdim=True)
    var = c.pow(2).mean()
    kurt = float(c.pow(4).mean() / var.pow(2) - 3.0)
    per = c.pow(2).mean(dim=(-2, -1))
    h = (c[..., :, 1:] * c[..., :, :-1]).mean(dim=(-2, -1)) / per
    v = (c[..., 1:, :] * c[..., :-1, :]).mean(dim=(-2, -1)) / per
    return {"std": float(e.std()), "kurtosis": kurt, "autocorr": float(0.5 * (h + v).mean())}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by torch ops inside the block (on any
    device), net of what was freed: a CPU stand-in for ``torch.cuda.max_memory_allocated``
    that counts activations, autograd's saved tensors and the solvers' histories, not
    the weights that existed before. Slow (a Python hook per op): a separate pass."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict = {}

    def _free(self, key):
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._live:
                    size = storage.nbytes()
                    self._live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_memory(fn) -> int:
    """Peak bytes allocated while ``fn()`` runs: CUDA's counter on a GPU, else
    :class:`PeakMemory`."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    mode = PeakMemory()
    with mode:
        fn()
    return mode.peak


def timed(fn, repeat: int = 1):
    """(result of the last call, best wall time in seconds over ``repeat`` calls)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def geomean(values) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return float(np.exp(np.mean(np.log(vals)))) if vals else float("nan")
