"""A per-frequency model of the step Jacobian: Gaussian data with the latent's own
radially averaged power spectrum (a Wiener-filter denoiser), diagonal in Fourier space.

For Gaussian data of variance c_k in Fourier mode k, dD/dz is diagonal there with the
gain ``StepProblem.denoiser_gain(c_k)``, so dr/dz has the eigenvalue
``StepProblem.slope(gain_k)`` on mode k: about 1 on the image's strong low frequencies
and sigma/sigma' on the weak high ones, the spread a single scalar slope cannot follow.
"""
from __future__ import annotations

import torch


def _radial_bins(height: int, width: int, device) -> tuple[torch.Tensor, int]:
    """Radial frequency bin of every rfft2 coefficient, and the number of bins."""
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(width, device=device).view(1, -1)
    radius = (fy ** 2 + fx ** 2).sqrt() * min(height, width)
    index = radius.round().long().flatten()
    return index, int(index.max()) + 1


def radial_power(x: torch.Tensor) -> torch.Tensor:
    """Per sample and channel, the power |X_k|^2 (orthonormal rfft2 over the last two
    dims) averaged over rings of equal |k|, laid back on the rfft2 grid."""
    spectrum = torch.fft.rfft2(x.float(), norm="ortho").abs().pow(2)
    grid = spectrum.shape[-2:]
    flat = spectrum.flatten(-2).flatten(0, -2)  # (M, H * W')
    index, bins = _radial_bins(x.shape[-2], x.shape[-1], x.device)
    total = torch.zeros(flat.shape[0], bins, device=x.device).index_add_(1, index, flat)
    count = torch.zeros(bins, device=x.device).index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    ring = total / count.clamp_min(1)
    return ring[:, index].view(*spectrum.shape[:-2], *grid)


def supported(x: torch.Tensor) -> bool:
    """Images and videos (B, C, [T,] H, W) with H, W >= 4; other latents keep the scalar model."""
    return x.ndim >= 4 and min(x.shape[-2:]) >= 4


def apply(diagonal: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F^-1 diag F x for a real, radially symmetric diagonal on the rfft2 grid."""
    return torch.fft.irfft2(torch.fft.rfft2(x.float(), norm="ortho") * diagonal,
                            s=x.shape[-2:], norm="ortho").to(x.dtype)

