"""Frozen noise maps: ancestral (Euler-a) steps made deterministic and invertible.

One generation step from sigma' down to sigma of ComfyUI's ``euler_ancestral`` is

    x_sigma = scale * (x + (sigma_down - sigma') * d(x, sigma')) + noise_scale * n

(EPS: k-diffusion's ``get_ancestral_step``, scale = 1, noise_scale = sigma_up;
flow: ``sample_euler_ancestral_RF``). With the noise map n frozen this is the Euler
step to sigma_down of a shifted target, so its inverse is the same implicit equation
as the deterministic step (``problem.py``) with

    z_prev := (z_sigma - noise_scale * n) / scale,   sigma := sigma_down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class AncestralStep:
    sigma_down: float
    scale: float
    noise_scale: float

    @property
    def uses_noise(self) -> bool:
        return self.noise_scale > 0


def ancestral_step(sigma_from: float, sigma_to: float, family: str, eta: float = 1.0) -> AncestralStep:
    """Coefficients of one Euler-ancestral step from ``sigma_from`` down to ``sigma_to``
    (eta 0, or a step to sigma 0: the deterministic Euler step, scale 1, no noise)."""
    if sigma_to <= 0 or eta <= 0:
        return AncestralStep(sigma_to, 1.0, 0.0)
    if family == "flow":
        sigma_down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)
        alpha, alpha_down = 1 - sigma_to, 1 - sigma_down
        noise_scale = max(sigma_to ** 2 - sigma_down ** 2 * alpha ** 2 / alpha_down ** 2, 0.0) ** 0.5
        return AncestralStep(sigma_down, alpha / alpha_down, noise_scale)
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return AncestralStep((sigma_to ** 2 - sigma_up ** 2) ** 0.5, 1.0, sigma_up)


def seeded_noise_maps(like: torch.Tensor, sigmas_desc: torch.Tensor, family: str, seed: int,
                      eta: float = 1.0) -> list[Optional[torch.Tensor]]:
    """The noise maps ComfyUI's ``euler_ancestral`` draws with ``seed`` (its
    ``default_noise_sampler``: one generator on ``like``'s device, one ``randn`` per step
    that adds noise), in generation order; None for steps that add none."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(int(seed))
    maps: list[Optional[torch.Tensor]] = []
    for i in range(len(sigmas_desc) - 1):
        step = ancestral_step(float(sigmas_desc[i]), float(sigmas_desc[i + 1]), family, eta)
        maps.append(torch.randn(like.size(), dtype=like.dtype, layout=like.layout, device=like.device,
                                generator=generator) if step.uses_noise else None)
    return maps


def check_noise_maps(noise_maps: Sequence[Optional[torch.Tensor]], steps: int, shape) -> None:
    from .errors import InversionInputError
    if len(noise_maps) != steps:
        raise InversionInputError(f"noise_maps: expected {steps} entries (one per step), got {len(noise_maps)}")
    for n in noise_maps:
        if n is not None and tuple(n.shape) != tuple(shape):
            raise InversionInputError(f"noise_maps: map of shape {tuple(n.shape)} does not match the "
                                      f"latent {tuple(shape)}")
