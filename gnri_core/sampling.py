"""k-diffusion-style sampler functions over the core, for hosts such as ComfyUI's
``KSAMPLER``: ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts)``
where ``model(x, sigma, **extra_args)`` returns the denoised x0 estimate."""
from __future__ import annotations

import torch

from .ancestral import seeded_noise_maps
from .invert import invert, reconstruct


def sigmas_ascend(sigmas: torch.Tensor) -> bool:
    return len(sigmas) > 1 and float(sigmas[-1]) > float(sigmas[0])


def sample_guided_nr(model, x, sigmas, extra_args=None, callback=None, disable=None,
                     method="gnri", family="eps", check_interrupt=None, result_sink=None,
                     ancestral=False, eta=1.0, trajectory=None, mask=None, **options):
    """Inverts on ascending sigmas (FlipSigmas) with ``method``; samples with the
    matching deterministic Euler/DDIM step on descending sigmas.

    ``ancestral``: Euler-ancestral with the frozen noise maps ComfyUI's
    ``euler_ancestral`` draws from ``extra_args["seed"]`` (so stock euler_ancestral
    with the same seed regenerates). ``trajectory``/``mask`` (descending sampling only):
    keep the trajectory outside the mask (see ``reconstruct``). ``result_sink`` (a list)
    receives the :class:`InversionResult`.
    """
    extra_args = {} if extra_args is None else extra_args
    descending = sigmas.flip(0) if sigmas_ascend(sigmas) else sigmas
    noise_maps = (seeded_noise_maps(x, descending, family, extra_args.get("seed") or 0, eta)
                  if ancestral else None)

    def denoise(z, sigma):
        return model(z, sigma, **extra_args)

    def report(info):
        if callback is not None:
            callback({"x": info["x"], "i": info["i"], "sigma": info["sigma"], "sigma_hat": info["sigma"],
                      "denoised": info.get("denoised", info["x"]), "total": info.get("total")})

    if sigmas_ascend(sigmas):
        result = invert(denoise, x, sigmas, method=method, family=family, callback=report,
                        check_interrupt=check_interrupt, noise_maps=noise_maps, eta=eta, **options)
        if result_sink is not None:
            result_sink.append(result)
        return result.noise.to(x.dtype)
    return reconstruct(denoise, x, sigmas, callback=report, check_interrupt=check_interrupt,
                       noise_maps=noise_maps, eta=eta, family=family, trajectory=trajectory,
                       mask=mask).to(x.dtype)
