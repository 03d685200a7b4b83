"""Analytic denoisers with exactly known answers, for tests of the torch-only core.

Pure torch (no ComfyUI). Every denoiser follows ComfyUI's convention

    denoise(x, sigma) -> D(x, sigma) = E[x0 | x_sigma = x]      (x0-prediction)

with ``x`` a latent shaped like an image batch, (B, C, H, W), and ``sigma`` a per-batch
tensor of shape (B,). Two parametrisations (``family``):

* ``"eps"`` (EPS / V_PREDICTION models): x = x0 + sigma * eps, sigma in [0, inf);
* ``"flow"`` (CONST / flow matching):     x = (1 - sigma) * x0 + sigma * eps, sigma in [0, 1]
  (at sigma = 1 the input carries no information and D = E[x0]).

Data distributions (the posterior mean is exact for both):

* :class:`LinearGaussian`: x0 ~ N(m, Q diag(c) Q^T) with a random orthogonal Q;
* :class:`GaussianMixture`: x0 ~ sum_k pi_k N(mu_k, s^2 I) (few components, small s).

By default the denoisers compute in float64 and return the input's dtype; with
``compute_dtype=None`` they compute in the input's own dtype (half-precision tests).

Generation helpers run the deterministic Euler sampler of the core
(:func:`gnri_core.reconstruct`) from known noise, giving "images the model itself
generated" whose exact inverse (the noise, and every intermediate latent) is known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import gnri_core

SHAPE = (4, 8, 8)  # (C, H, W) of the test latents
FAMILIES = ("eps", "flow")
PROBLEMS = ("gaussian", "mixture")

# Default schedules, ascending (inversion order); 4 steps each.
EPS_SIGMAS = (0.0, 0.3, 1.0, 3.0, 10.0)
FLOW_SIGMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def ascending_sigmas(family: str, start: Optional[float] = None) -> torch.Tensor:
    """The default ascending schedule of ``family``; ``start`` replaces sigmas[0]
    (e.g. 1e-4 as ComfyUI's FlipSigmas does)."""
    sigmas = torch.tensor(EPS_SIGMAS if family == "eps" else FLOW_SIGMAS, dtype=torch.float32)
    if start is not None:
        sigmas[0] = start
    return sigmas


def _alpha(sigma: torch.Tensor, family: str) -> torch.Tensor:
    """Signal scale a(sigma): x = a * x0 + sigma * eps."""
    return torch.ones_like(sigma) if family == "eps" else 1.0 - sigma


class AnalyticDenoiser:
    """Common plumbing: flattening, dtype handling, data sampling."""

    family: str
    shape: tuple
    compute_dtype: Optional[torch.dtype]

    def __init__(self, family: str, shape=SHAPE, compute_dtype: Optional[torch.dtype] = torch.float64):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        self.family = family
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        self.compute_dtype = compute_dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise AssertionError(f"sigma must have shape (B,) = ({x.shape[0]},), got {tuple(sigma.shape)}")
        if tuple(x.shape[1:]) != self.shape:
            raise AssertionError(f"latent shape {tuple(x.shape)} does not match {self.shape}")
        dtype = self.compute_dtype or x.dtype
        flat = x.reshape(x.shape[0], self.dim).to(dtype)
        s = sigma.to(device=x.device, dtype=dtype).view(-1, 1)
        return self.posterior_mean(flat, s).reshape(x.shape).to(x.dtype)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # (B, D), (B, 1)
        raise NotImplementedError

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n draws of x0 from the data distribution ("real images"), float32."""
        raise NotImplementedError

    def with_dtype(self, compute_dtype: Optional[torch.dtype]) -> "AnalyticDenoiser":
        """The same denoiser computing in ``compute_dtype`` (None: the input's dtype)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.compute_dtype = compute_dtype
        return clone

    def _c(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=like.dtype)


class LinearGaussian(AnalyticDenoiser):
    """x0 ~ N(m, Q diag(c) Q^T); exact posterior mean

        EPS:  D = m + Q diag(c / (c + s^2)) Q^T (x - m)
        flow: D = m + Q diag((1-s) c / ((1-s)^2 c + s^2)) Q^T (x - (1-s) m)
    """

    def __init__(self, family: str = "eps", shape=SHAPE, seed: int = 0, c_min: float = 0.25,
                 c_max: float = 2.0, mean_scale: float = 0.5,
                 compute_dtype: Optional[torch.dtype] = torch.float64):
        super().__init__(family, shape, compute_dtype)
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        self.Q = q
        # log-uniform spectrum in [c_min, c_max]
        u = torch.rand(self.dim, generator=g, dtype=torch.float64)
        self.c = c_min * (c_max / c_min) ** u
        self.m = mean_scale * torch.randn(self.dim, generator=g, dtype=torch.float64)

    def gain(self, sigma: torch.Tensor) -> torch.Tensor:
        """Eigenvalues of dD/dx, shape (B, D) for sigma of shape (B, 1)."""
        c = self._c(self.c, sigma)
        if self.family == "eps":
            return c / (c + sigma ** 2)
        a = 1.0 - sigma
        return a * c / (a ** 2 * c + sigma ** 2)

    def posterior_mean(self, x, sigma):
        q, m = self._c(self.Q, x), self._c(self.m, x)
        centre = m if self.family == "eps" else (1.0 - sigma) * m
        y = ((x - centre) @ q) * self.gain(sigma)
        return m + y @ q.T

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, self.dim, generator=g, dtype=torch.float64) * self.c.sqrt()
        return (self.m + w @ self.Q.T).float().reshape(n, *self.shape)


class GaussianMixture(AnalyticDenoiser):
    """x0 ~ sum_k pi_k N(mu_k, s^2 I); with x = a x0 + sigma eps (a = 1 or 1 - sigma),
    v = a^2 s^2 + sigma^2, the exact posterior mean is

        D = sum_k w_k (mu_k + (a s^2 / v)(x - a mu_k)),   w = softmax_k(log pi_k - |x - a mu_k|^2 / 2v)
    """

    def __init__(self, family: str = "eps", shape=SHAPE, seed: int = 0, components: int = 3,
                 std: float = 0.2, mean_scale: float = 1.0,
                 compute_dtype: Optional[torch.dtype] = torch.float64):
        super().__init__(family, shape, compute_dtype)
        g = torch.Generator().manual_seed(seed)
        self.mu = mean_scale * torch.randn(components, self.dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        self.log_pi = (weights / weights.sum()).log()
        self.std = float(std)

    def posterior_mean(self, x, sigma):
        mu, log_pi = self._c(self.mu, x), self._c(self.log_pi, x)
        a = _alpha(sigma, self.family)                          # (B, 1)
        var = a ** 2 * self.std ** 2 + sigma ** 2               # (B, 1)
        diff = x[:, None, :] - a[:, :, None] * mu[None]          # (B, K, D)
        logits = log_pi[None] - diff.pow(2).sum(-1) / (2 * var)  # (B, K)
        w = torch.softmax(logits, dim=1)
        post = mu[None] + (a * self.std ** 2 / var)[:, :, None] * diff
        return (w[:, :, None] * post).sum(1)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_pi.exp(), n, replacement=True, generator=g)
        x = self.mu[k] + self.std * torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return x.float().reshape(n, *self.shape)


def make_denoiser(problem: str, family: str, **kwargs) -> AnalyticDenoiser:
    if problem == "gaussian":
        return LinearGaussian(family, **kwargs)
    if problem == "mixture":
        return GaussianMixture(family, **kwargs)
    raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")


class CountingDenoiser:
    """Wraps a denoiser; records every call (count, input dtype, sigma, grad mode), and
    optionally asserts that no autograd graph can be built (``forbid_grad``) and counts
    backward passes through its output (``backward_passes``)."""

    def __init__(self, inner: Callable, forbid_grad: bool = False, events: Optional[list] = None):
        self.inner = inner
        self.forbid_grad = forbid_grad
        self.calls = 0
        self.dtypes: List[torch.dtype] = []
        self.sigmas: List[torch.Tensor] = []
        self.grad_enabled: List[bool] = []
        self.backward_passes = 0
        self.events = events

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.forbid_grad:
            assert not torch.is_grad_enabled(), "the denoiser was called with grad enabled"
            assert not x.requires_grad, "the denoiser input requires grad"
        self.calls += 1
        self.dtypes.append(x.dtype)
        self.sigmas.append(sigma.detach().clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        if self.events is not None:
            self.events.append("call")
        out = self.inner(x, sigma)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad):
        self.backward_passes += 1
        return grad


@dataclass
class Generated:
    """An image the model generated from known noise with the Euler sampler.

    x0:         the generated clean latent (float32).
    noise:      the latent at sigma_max that generated it (the exact inverse).
    trajectory: latents at every ascending sigma; trajectory[0] = x0, [-1] = noise.
    sigmas:     the ascending schedule.
    """

    x0: torch.Tensor
    noise: torch.Tensor
    trajectory: List[torch.Tensor]
    sigmas: torch.Tensor


def initial_noise(family: str, sigma_max: float, batch: int = 2, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """The latent at sigma_max as ComfyUI's noise scaling makes it from a unit Gaussian:
    EPS: sigma_max * n; flow: sigma_max * n + (1 - sigma_max) * 0 (= n at sigma_max = 1)."""
    g = torch.Generator().manual_seed(seed)
    return sigma_max * torch.randn(batch, *shape, generator=g)


def generate(denoise: Callable, noise: torch.Tensor, sigmas: torch.Tensor) -> Generated:
    """Runs the deterministic Euler sampler (:func:`gnri_core.reconstruct`) from ``noise``
    down the ascending schedule ``sigmas`` (flipped); records the whole trajectory."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    states: List[torch.Tensor] = []
    x0 = gnri_core.reconstruct(denoise, noise, sigmas.flip(0),
                               callback=lambda info: states.append(info["x"].clone()))
    trajectory = [x0] + states[::-1][1:] + [noise.float()]
    return Generated(x0=x0, noise=noise.float(), trajectory=trajectory, sigmas=sigmas)


def generated_image(problem: str, family: str, batch: int = 2, seed: int = 0,
                    sigmas: Optional[torch.Tensor] = None, **kwargs):
    """(denoiser, Generated) for ``problem``/``family`` on the default schedule."""
    denoise = make_denoiser(problem, family, **kwargs)
    sigmas = ascending_sigmas(family) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    noise = initial_noise(family, float(sigmas[-1]), batch=batch, seed=seed + 1000)
    return denoise, generate(denoise, noise, sigmas)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over the batch of ||a - b|| / ||b||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())
