"""Where ComfyUI meets the core: the KSAMPLER subclass, the inverted-noise NOISE
object, model-family detection and input checks. No math lives here."""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from ..gnri_core import (InversionInputError, InversionResult, check_latent, check_method, check_sigmas,
                         sample_guided_nr, sigmas_ascend)

logger = logging.getLogger(__name__)


def model_family(model) -> str:
    """'eps' (EPS, V-prediction, EDM) or 'flow' (CONST) from the model's sampling object;
    other sampling types are rejected."""
    sampling = model.get_model_object("model_sampling")
    supported = isinstance(sampling, comfy.model_sampling.CONST) or (
        isinstance(sampling, comfy.model_sampling.EPS)
        and not isinstance(sampling, comfy.model_sampling.IMG_TO_IMG))
    if not supported:
        raise InversionInputError(
            f"model: its sampling type {type(sampling).__name__} is not supported; "
            "expected an EPS, V-prediction or flow (CONST) model")
    return family_of_sampling(sampling)


PREDICTIONS = ("IMG_TO_IMG", "X0", "EDM", "V_PREDICTION", "CONST", "EPS")  # subclasses first


def prediction_type(model) -> str:
    """The model's prediction type (ComfyUI builds its sampling class dynamically)."""
    sampling = model.get_model_object("model_sampling")
    return next((name for name in PREDICTIONS if hasattr(comfy.model_sampling, name)
                 and isinstance(sampling, getattr(comfy.model_sampling, name))), type(sampling).__name__)


def family_of_sampling(model_sampling) -> str:
    return "flow" if isinstance(model_sampling, comfy.model_sampling.CONST) else "eps"


def check_latent_for_model(model, latent: dict, name: str = "latent") -> torch.Tensor:
    """The latent's samples, after checking channels against the model and finiteness."""
    samples = latent["samples"]
    expected = model.get_model_object("latent_format").latent_channels
    if samples.ndim < 4 or samples.shape[1] != expected:
        shape = tuple(samples.shape)
        raise InversionInputError(
            f"{name}: has shape {shape} ({shape[1] if samples.ndim > 1 else '?'} channels) but this "
            f"model expects {expected} latent channels; encode the image with this model's VAE")
    check_latent(samples, name)
    return samples


def check_finite(**values: float) -> None:
    """Widget values must be finite numbers (raw API prompts can send NaN / inf)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise InversionInputError(f"{name}: must be a finite number, got {value}")


def empty_latent_note(samples: torch.Tensor) -> list[str]:
    if torch.count_nonzero(samples):
        return []
    return ["latent: all zeros (an empty latent such as EmptyLatentImage), not an encoded image; "
            "its inversion means nothing. VAE-encode an image"]


def batch_notes(batch: int, **conditionings: Optional[list]) -> list[str]:
    """Which prompt each image gets when a conditioning batch does not match the latent batch
    (ComfyUI repeats the prompts: image i gets prompt i mod n)."""
    notes = []
    for name, conditioning in conditionings.items():
        sizes = {int(c[0].shape[0]) for c in conditioning or []}
        for n in sorted(sizes - {1, batch}):
            given = ", ".join(f"image {i + 1} gets prompt {i % n + 1}" for i in range(n, batch))
            notes.append(f"{name}: {n} prompts for a latent batch of {batch}; "
                         + (f"ComfyUI repeats them ({given})" if n < batch else f"prompts {batch + 1}.. are unused")
                         + f"; give 1 or {batch} prompts")
    return notes


def model_fingerprint(model) -> tuple:
    """Which weights a model has, cheaply: (a weak reference to the object holding them,
    sums over slices of its first and last parameters)."""
    params = list(model.get_model_object("diffusion_model").parameters())
    sums = []
    try:
        for p in params[:2] + params[-2:]:
            part = p.detach().flatten()[:4096].float()
            sums += [float(part.sum()), float(part.abs().sum())]
    except Exception:  # weights on "meta" or quantised tensor types: compare the object only
        sums = []
    return weakref.ref(model.model), tuple(sums)


def same_weights(a: tuple, b: tuple) -> bool:
    """The same model object (patched or not), or weights with the same sums."""
    return a[0]() is b[0]() is not None or (len(a[1]) == len(b[1]) and all(
        math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a[1], b[1])))


def check_gradient(family: str, options: dict) -> None:
    if options.get("gradient") == "autograd" and family == "flow":
        raise InversionInputError(
            "newton_form: paper_autograd differentiates through the network, which works on UNet "
            "(EPS / V-prediction) models only; flow models (Flux, SD3) change tensors in place, "
            "which autograd cannot follow. Use secant (the default) or paper_detached.")


def notes_text(notes: list[str], report: str = "") -> str:
    """A node's UI text: its warnings (also logged), then its report."""
    for note in notes:
        logger.warning("GNRI: %s", note)
    return "\n".join([f"warning: {n}" for n in notes] + ([report] if report else []))


def schedule(model, steps: int, scheduler: str, sigmas: Optional[torch.Tensor]) -> torch.Tensor:
    """Ascending sigmas for inversion: the SIGMAS input (either direction) or the
    model's ``scheduler`` schedule with ``steps`` steps, flipped."""
    if sigmas is not None:
        sigmas = sigmas.float().cpu().flatten()
        if len(sigmas) < 2:
            raise InversionInputError(
                f"sigmas: needs at least 2 values (1 step), got {len(sigmas)}; a scheduler with "
                "denoise 0 (or steps 0) gives an empty schedule")
        ascending = sigmas_ascend(sigmas)
        check_sigmas(sigmas, ascending)  # quotes the sigmas as given
        return sigmas if ascending else sigmas.flip(0)
    if steps < 1:
        raise InversionInputError(f"steps: must be >= 1, got {steps}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise InversionInputError(f"scheduler: unknown {scheduler!r}; expected one of "
                                  f"{comfy.samplers.SCHEDULER_NAMES}")
    sampling = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).float().cpu().flip(0)


class GuidedNRKSampler(comfy.samplers.KSAMPLER):
    """KSAMPLER for ``gnri_core.sample_guided_nr`` that hands latents over exactly.

    Ascending sigmas (inversion): starts from the clean latent itself and skips
    ``inverse_noise_scaling`` (which divides by 1 - sigma and gives inf at sigma = 1
    on flow models). Descending sigmas with zero noise: the latent is taken as the
    sample at sigmas[0] (ComfyUI would scale it by 1 - sigma on flow models).
    """

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling
        check_gradient(family_of_sampling(sampling), self.extra_options)
        options = dict(self.extra_options, family=family_of_sampling(sampling),
                       check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        if sigmas_ascend(sigmas) or not torch.count_nonzero(noise):
            x = latent_image.clone()
        else:
            x = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        total = len(sigmas) - 1
        k_callback = None if callback is None else (  # inversion: the core's total counts its round-trip check
            lambda d: callback(d["i"], d["denoised"], d["x"], d.get("total") or total))
        return sample_guided_nr(model_k, x, sigmas, extra_args=extra_args, callback=k_callback,
                                disable=disable_pbar, **options)


def guided_nr_sampler(method: str, result_sink: Optional[list] = None, **options) -> GuidedNRKSampler:
    check_method(method)
    return GuidedNRKSampler(sample_guided_nr, extra_options=dict(
        options, method=method, result_sink=result_sink))


@dataclass
class Inversion:
    """The INVERSION object: what the editing nodes need to regenerate and edit.

    ``result.trajectory`` holds latents in the model's space (after
    ``process_latent_in``), ``sigmas`` ascend, ``latent_format`` converts back.
    """

    result: InversionResult
    family: str
    latent_shape: tuple
    model_name: str
    latent_format: object
    settings: dict = field(default_factory=dict)
    prediction: str = ""  # the model's sampling class (EPS, V_PREDICTION, CONST, ...)
    fingerprint: tuple = ()  # model_fingerprint of the model that inverted

    @property
    def sigmas(self) -> torch.Tensor:
        return self.result.sigmas


def check_inversion_for_model(model, inversion: Inversion) -> None:
    family = model_family(model)
    if family != inversion.family:
        raise InversionInputError(
            f"inversion: made with a {inversion.family} model, but this model is {family}; "
            "use the model that inverted the image")
    prediction = prediction_type(model)
    if inversion.prediction and prediction != inversion.prediction:
        raise InversionInputError(
            f"inversion: made with a model that predicts {inversion.prediction}, but this model "
            f"predicts {prediction}; use the model that inverted the image")
    channels = model.get_model_object("latent_format").latent_channels
    if inversion.latent_shape[1] != channels:
        raise InversionInputError(
            f"inversion: latents have {inversion.latent_shape[1]} channels, this model expects {channels}")
    if inversion.fingerprint and not same_weights(inversion.fingerprint, model_fingerprint(model)):
        raise InversionInputError(
            "inversion: made with a model with other weights than this one (another checkpoint of the "
            "same kind); connect the model that inverted the image, or invert again with this one")


class InvertedNoise:
    """NOISE for SamplerCustomAdvanced: chosen so that ComfyUI's own ``noise_scaling``
    of the given latent at the schedule's first sigma lands exactly on the inverted
    latent z_N (for any latent_image, including the source latent or an empty one)."""

    def __init__(self, noise: torch.Tensor, sigma_top: float, model_sampling, latent_format, seed: int = 0):
        self.seed = seed  # SamplerCustomAdvanced hands it to the sampler (frozen noise maps)
        self.noise = noise
        self.sigma_top = sigma_top
        self.model_sampling = model_sampling
        self.latent_format = latent_format

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"].float().cpu()
        if samples.shape != self.noise.shape:
            raise InversionInputError(
                f"latent_image: shape {tuple(samples.shape)} differs from the inverted latent "
                f"{tuple(self.noise.shape)}; use the latent that was inverted (or an empty one of its size)")
        if torch.count_nonzero(samples) > 0:  # CFGGuider shifts non-empty latents only
            samples = self.latent_format.process_in(samples)
        sampling = self.model_sampling
        sigma = torch.tensor([self.sigma_top])
        max_denoise = float(sampling.sigma_max) <= self.sigma_top * (1 + 1e-5)
        offset = sampling.noise_scaling(sigma, torch.zeros_like(samples), samples, max_denoise)
        gain = sampling.noise_scaling(sigma, torch.ones_like(samples), torch.zeros_like(samples), max_denoise)
        return (self.noise.cpu() - offset) / gain


def zero_conditioning(conditioning: list) -> list:
    """The conditioning with its tensors zeroed (ComfyUI's ConditioningZeroOut)."""
    zeroed = []
    for tensor, extras in conditioning:
        extras = dict(extras)
        if extras.get("pooled_output") is not None:
            extras["pooled_output"] = torch.zeros_like(extras["pooled_output"])
        zeroed.append([torch.zeros_like(tensor), extras])
    return zeroed


def progress_callback(steps: int):
    bar = comfy.utils.ProgressBar(steps)
    return lambda step, x0, x, total: bar.update_absolute(step + 1, total)


def invert_latent(model, positive, negative, latent: dict, sigmas: torch.Tensor, cfg: float,
                  method: str, seed: int = 0, **options) -> tuple[dict, Inversion]:
    """Runs the inversion through ComfyUI's own sampling (conds, patches, CFG, model
    loading); returns the inverted LATENT (in the latent's space) and the INVERSION."""
    family = model_family(model)
    samples = check_latent_for_model(model, latent)
    if negative is None:
        negative = zero_conditioning(positive)
    sink: list = []
    sampler = guided_nr_sampler(method, result_sink=sink, **options)
    inverted = comfy.sample.sample_custom(
        model, torch.zeros_like(samples), cfg, sampler, sigmas, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=progress_callback(len(sigmas) - 1), seed=seed)
    out = latent.copy()
    out.pop("noise_mask", None)
    out["samples"] = inverted
    inversion = Inversion(result=sink[-1], family=family, latent_shape=tuple(samples.shape),
                          model_name=type(model.model).__name__,
                          prediction=prediction_type(model), fingerprint=model_fingerprint(model),
                          latent_format=model.get_model_object("latent_format"),
                          settings=dict(options, method=method, cfg=cfg, seed=seed))
    return out, inversion
