"""The one implicit equation every inversion method solves, in ComfyUI's sigma space.

Generation steps from sigma' = sigmas[i+1] down to sigma = sigmas[i] with the
deterministic Euler/DDIM step evaluated at the noisier point:

    d(z, s)   = (z - D(z, s)) / s
    z_i       = z_{i+1} + (sigma - sigma') * d(z_{i+1}, sigma')

Inverting it means finding the root of

    r(z) = z - f(z),    f(z) = z_i + (sigma' - sigma) * d(z, sigma')

(``f`` is the fixed-point map of Meiri et al. / AIDI).  All solvers in
``solvers.py`` work on :class:`StepProblem`; none of them re-derives the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import InversionError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FAMILIES = ("eps", "flow")
ATOL = 1e-3  # absolute part of the residual scale (latent units, rms)


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """Converts a denoiser output to a Karras ODE derivative (k-diffusion's ``to_d``)."""
    return (x - denoised) / sigma


def batch_norm2(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every batch element, shape (B,)."""
    return x.flatten(1).norm(dim=1)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of every batch element, shape (B,)."""
    return x.flatten(1).pow(2).mean(1).sqrt()


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product of every batch element, shape (B,)."""
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a (B,) tensor to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


@dataclass
class StepProblem:
    """One inversion step: given ``z_prev`` at ``sigma``, find z at ``sigma_next``.

    Calls of ``denoise`` are counted in ``nfe``; iterates are float32 whatever the
    model's dtype (``model_dtype`` is what the model is fed).
    """

    denoise: Denoiser
    z_prev: torch.Tensor
    sigma: float
    sigma_next: float
    family: str
    model_dtype: torch.dtype = torch.float32
    carry: dict = field(default_factory=dict)  # state a solver hands to the next step
    nfe: int = 0
    frozen_noise: bool = False  # an ancestral step inverted with its frozen noise map

    @property
    def h(self) -> float:
        return self.sigma_next - self.sigma

    def _sigma_batch(self) -> torch.Tensor:
        return torch.full((self.z_prev.shape[0],), self.sigma_next,
                          dtype=torch.float32, device=self.z_prev.device)

    def denoised(self, z: torch.Tensor) -> torch.Tensor:
        """D(z, sigma') in float32; counts one model call and rejects non-finite output."""
        self.nfe += 1
        out = self.denoise(z.to(self.model_dtype), self._sigma_batch()).float()
        if not torch.isfinite(out).all():
            raise InversionError(
                f"the model returned NaN/inf at sigma={self.sigma_next:.4g} "
                "(check the model, its dtype and the latent)")
        return out

    def fixed_point_map(self, z: torch.Tensor, denoised: torch.Tensor | None = None) -> torch.Tensor:
        """f(z) = z_prev + (sigma' - sigma) * d(z, sigma')."""
        if denoised is None:
            denoised = self.denoised(z)
        return self.z_prev + self.h * to_d(z, self.sigma_next, denoised)

    def relative(self, r: torch.Tensor) -> torch.Tensor:
        """The one convergence measure, per batch element: rms(r) / (ATOL + rms(z_prev))
        (optimistix's atol + rtol |y| scale with norms: ||r|| / ||z_prev|| for ordinary
        latents, and still meaningful for an all-zero one)."""
        return rms(r) / (ATOL + rms(self.z_prev))

    def guidance_mean_var(self) -> tuple[torch.Tensor, float]:
        """Mean and variance of the forward process q(z_{i+1} | z_i) (method.md §1)."""
        s, s1 = self.sigma, self.sigma_next
        if self.family == "flow":
            gamma = (1.0 - s1) / (1.0 - s)
            return gamma * self.z_prev, s1 ** 2 - gamma ** 2 * s ** 2
        return self.z_prev, s1 ** 2 - s ** 2


    def denoiser_gain(self, data_variance: torch.Tensor) -> torch.Tensor:
        """dD/dz at sigma' for Gaussian data of per-sample variance c (a scalar Jacobian model).

        EPS: c / (c + s^2);  flow: (1 - s) c / ((1 - s)^2 c + s^2).
        """
        s = self.sigma_next
        if self.family == "flow":
            return (1 - s) * data_variance / ((1 - s) ** 2 * data_variance + s ** 2)
        return data_variance / (data_variance + s ** 2)

    def data_variance(self, gain: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`denoiser_gain`: the c that explains a measured gain."""
        s = self.sigma_next
        gain = gain.clamp(1e-4, (1 - 1e-4) * self.max_gain())
        if self.family == "flow":
            return gain * s ** 2 / ((1 - s) * (1 - gain * (1 - s))).clamp_min(1e-8)
        return gain * s ** 2 / (1 - gain)

    def max_gain(self) -> float:
        """Sup of dD/dz over data variances: 1 (EPS), 1 / (1 - sigma') (flow: D undoes the 1 - sigma' scaling)."""
        if self.family == "flow":
            return 1.0 / max(1.0 - self.sigma_next, 1e-6)
        return 1.0

    def slope_bounds(self) -> tuple[float, float]:
        """dr/dz = sigma/sigma' + (h/sigma') dD/dz for 0 <= dD/dz <= max_gain: noise directions
        have slope sigma/sigma', content directions 1 (EPS) or (1 - sigma)/(1 - sigma') (flow)."""
        return max(self.sigma / self.sigma_next, 1e-2), float(self.slope(self.max_gain()))

    def clean_power(self, power: torch.Tensor) -> torch.Tensor:
        """Data variance per Fourier mode from the power of a latent at sigma (noise removed):
        EPS c = P - s^2, flow c = (P - s^2) / (1 - s)^2 (floored at 1e-8)."""
        s = self.sigma
        scale = (1 - s) ** 2 if self.family == "flow" else 1.0
        return ((power - s ** 2) / max(scale, 1e-6)).clamp_min(1e-8)

    def gaussian_slope(self, data_variance: torch.Tensor) -> torch.Tensor:
        """dr/dz for Gaussian data of that variance (per sample, or per Fourier mode: its
        power), within ``slope_bounds``."""
        low, high = self.slope_bounds()
        return self.slope(self.denoiser_gain(data_variance)).clamp(low, high)

    def slope(self, gain: torch.Tensor) -> torch.Tensor:
        """dr/dz for a denoiser gain dD/dz."""
        return self.sigma / self.sigma_next + self.h / self.sigma_next * gain

    def gain(self, slope: torch.Tensor) -> torch.Tensor:
        return (slope - self.sigma / self.sigma_next) * self.sigma_next / self.h


def converged(relative_residual: torch.Tensor, tol: float) -> bool:
    """True when every batch element's relative residual is below ``tol``."""
    return tol > 0 and bool((relative_residual <= tol).all())
