"""The world's exact "VAE": a per-pixel linear map between RGB and a latent, no
downsampling (16x16 image <-> 16x16 latent).  Imports only torch.

Decoding is ComfyUI's own latent preview of ``latent / SCALE``: ``rgb = (latent / SCALE
@ latent_rgb_factors + bias + 1) / 2``; encoding is its pseudo-inverse, so
``decode(encode(img)) == img`` (to float rounding).  ``SCALE`` brings the model-space
latents (after ComfyUI's ``process_in``) to std ~1 (0.25 unscaled for SD15, 0.64 for
Flux: most of the SD sigma schedule would be pure noise); ComfyUI's live previews
therefore show the colours SCALE times too saturated.  Factors are copied from
``comfy/latent_formats.py`` (SD15: 4 channels, no bias; Flux: 16 channels + bias).
"""
from __future__ import annotations

import torch

SD15_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
FLUX_FACTORS = [
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
]
FLUX_BIAS = [-0.0329, -0.0718, -0.0851]
FACTORS = {"unet": (SD15_FACTORS, [0.0, 0.0, 0.0]), "flux": (FLUX_FACTORS, FLUX_BIAS)}
FAMILIES = tuple(FACTORS)
SCALE = {"unet": 4.0, "flux": 1.5}


def _factors(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    if family not in FACTORS:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    f, b = FACTORS[family]
    return torch.tensor(f, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def channels(family: str) -> int:
    return len(_factors(family)[0])


def encode(image: torch.Tensor, family: str) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> raw LATENT samples [B, C, H, W]."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [B, H, W, 3], got {tuple(image.shape)}")
    f, b = _factors(family)
    lat = (image.double() * 2 - 1 - b) @ torch.linalg.pinv(f) * SCALE[family]
    return lat.permute(0, 3, 1, 2).float().contiguous()


def decode(latent: torch.Tensor, family: str) -> torch.Tensor:
    """Raw LATENT samples [B, C, H, W] -> IMAGE [B, H, W, 3], clamped to [0, 1]."""
    f, b = _factors(family)
    if latent.ndim != 4 or latent.shape[1] != len(f):
        raise ValueError(f"latent: expected [B, {len(f)}, H, W] for {family}, got {tuple(latent.shape)}")
    rgb = latent.double().permute(0, 2, 3, 1) / SCALE[family] @ f + b
    return ((rgb + 1) / 2).clamp(0, 1).float()
