"""What exact inversion is for beyond editing (GNRI paper): interpolation between two
inverted images, and seeds for a rare concept drawn near the inversions of its examples.

Inverted noises are (close to) samples of the Gaussian the sampler starts from. Mixing
them must keep them so: a linear mix of two independent Gaussian samples has a smaller
norm (sqrt(1/2) at the midpoint), which the sampler turns into a washed-out image;
spherical interpolation keeps the norm. Every function works per batch element on
(B, ...) tensors and keeps the endpoints bit-exact.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import InversionInputError


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), per batch element:
    the direction moves along the great circle, the norm moves linearly from |a| to |b|
    (so two noises of equal norm stay at that norm). t = 0 and 1 return ``a`` and ``b``
    exactly; (anti)parallel pairs, whose great circle is undefined, fall back to lerp."""
    if a.shape != b.shape:
        raise InversionInputError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if not 0.0 <= t <= 1.0:
        raise InversionInputError(f"slerp: t must lie in [0, 1], got {t}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    fa, fb = _flat(a), _flat(b)
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)
    ua, ub = fa / na.clamp_min(1e-30), fb / nb.clamp_min(1e-30)
    theta = (ua * ub).sum(dim=1, keepdim=True).clamp(-1.0, 1.0).acos()
    sin = theta.sin()
    curved = sin > 1e-6
    safe = torch.where(curved, sin, torch.ones_like(sin))
    direction = (torch.sin((1 - t) * theta) * ua + torch.sin(t * theta) * ub) / safe
    out = torch.where(curved, direction * ((1 - t) * na + t * nb), torch.lerp(fa, fb, t))
    return out.reshape(a.shape).to(a.dtype)


def frame_weights(frames: int) -> list[float]:
    """``frames`` evenly spaced interpolation weights from 0 to 1 (both ends included)."""
    if frames < 2:
        raise InversionInputError(f"frames: must be >= 2 (the two ends), got {frames}")
    return [i / (frames - 1) for i in range(frames)]


def concept_noise(examples: torch.Tensor, count: int, spread: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``count`` noises near the inverted noises ``examples`` (K, ...) of a concept.

    The centre is the examples' centroid, rescaled to their mean norm (a plain mean of
    K noises is too short to be a sample). Each draw turns the centre towards its own
    random direction, orthogonal to the centre, by the angle ``spread`` x 90 degrees and
    keeps the centre's norm:

        z = |c| (cos(spread*pi/2) c/|c| + sin(spread*pi/2) r),   r random, r _|_ c, |r| = 1

    spread 0: every draw is the centre; 1: the draws share nothing with the examples
    (random noise of the examples' norm); in between, cos(spread*pi/2) is the cosine
    similarity of every draw with the centre (0.5: 0.71). Seeded by ``generator``.
    """
    if examples.ndim < 2 or examples.shape[0] < 1:
        raise InversionInputError("examples: need a batch (K, ...) of at least one inverted noise")
    if not 0.0 <= spread <= 1.0:
        raise InversionInputError(f"spread: must lie in [0, 1], got {spread}")
    if count < 1:
        raise InversionInputError(f"count: must be >= 1, got {count}")
    flat = _flat(examples)
    centre = flat.mean(dim=0)
    norm = flat.norm(dim=1).mean()
    unit = centre / centre.norm().clamp_min(1e-30)
    r = torch.randn(count, flat.shape[1], generator=generator, dtype=torch.float64)
    r = r - (r @ unit)[:, None] * unit[None]
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
    angle = spread * math.pi / 2
    draws = norm * (math.cos(angle) * unit[None] + math.sin(angle) * r)
    return draws.reshape(count, *examples.shape[1:]).to(examples.dtype)
