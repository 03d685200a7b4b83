"""The public functions: invert, sample back and edit with a diffusers model and scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gnri_core import InversionInputError, InversionResult, check_latent, invert, reconstruct

from .denoiser import DiffusersDenoiser, PromptEmbeds, as_prompt, model_kind, pack_flux
from .schedule import Schedule, make_schedule


@dataclass
class DiffusersInversion:
    """What :func:`invert_latents` found, in the scheduler's sample space.

    noise:       the inverted latent at the schedule's highest level: the sample a
                 scheduler loop starts from (``for t in scheduler.timesteps: ...``).
    latents:     the ``latents=`` argument for the pipeline (``noise`` divided by the
                 scheduler's ``init_noise_sigma``; packed for Flux).
    trajectory:  scheduler samples at every level, ``trajectory[0]`` the input latents.
    result:      the core's :class:`InversionResult` (core space; nfe, residuals, ...).
    schedule, prompt, negative, guidance_scale, embedded_guidance, kind: for editing.
    """

    noise: torch.Tensor
    latents: torch.Tensor
    trajectory: list
    result: InversionResult
    schedule: Schedule
    prompt: PromptEmbeds
    negative: Optional[PromptEmbeds] = None
    guidance_scale: float = 1.0
    embedded_guidance: Optional[float] = None
    kind: str = "unet"


def pipeline_latents(noise: torch.Tensor, schedule: Schedule, kind: str) -> torch.Tensor:
    """The ``latents=`` argument a diffusers pipeline turns into ``noise``."""
    latents = noise / schedule.init_noise_sigma
    return pack_flux(latents) if kind == "flux" else latents


def _schedule_for(model, scheduler, latents, num_inference_steps, schedule, sigmas, mu, kind):
    if schedule is not None:
        return schedule
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        h, w = latents.shape[-2:]
        if kind == "flux" and sigmas is None:  # FluxPipeline's default schedule
            sigmas = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()
        seq = (h // 2) * (w // 2)
        return make_schedule(scheduler, num_inference_steps, sigmas=sigmas, mu=mu, image_seq_len=seq)
    return make_schedule(scheduler, num_inference_steps, sigmas=sigmas)


def invert_latents(model, scheduler, latents: torch.Tensor, prompt_embeds, *, num_inference_steps: int = 50,
                   pooled_prompt_embeds=None, negative_prompt_embeds=None,
                   negative_pooled_prompt_embeds=None, added_cond_kwargs=None, guidance_scale: float = 1.0,
                   embedded_guidance_scale: Optional[float] = None, method: str = "gnri",
                   schedule: Optional[Schedule] = None, sigmas=None,
                   mu: Optional[float] = None, **options) -> DiffusersInversion:
    """Inverts ``latents`` (the scheduler's clean sample: VAE latents times the scaling
    factor; Flux: unpacked (B, 16, H, W)) up ``scheduler``'s schedule with ``method``.

    The prompt is given as a pipeline's ``encode_prompt`` returns it; CFG with
    ``guidance_scale`` != 1 uses ``negative_prompt_embeds`` (default: zeros). ``options``
    go to ``gnri_core.invert`` (``max_iters``, ``tol``, ``lam``, ...). Sampling back with
    the same prompt, schedule and guidance (diffusers' own loop from ``.noise``, the
    pipeline from ``.latents``, or :func:`sample_latents`) reproduces ``latents``.
    """
    check_latent(latents, "latents")
    kind = model_kind(model)
    prompt = as_prompt(prompt_embeds, pooled_prompt_embeds, added_cond_kwargs)
    negative = as_prompt(negative_prompt_embeds, negative_pooled_prompt_embeds, added_cond_kwargs)
    schedule = _schedule_for(model, scheduler, latents, num_inference_steps, schedule, sigmas, mu, kind)
    denoiser = DiffusersDenoiser(model, schedule, prompt, negative, guidance_scale, embedded_guidance_scale,
                                 kind=kind)
    x0 = schedule.to_core(latents, 0)
    result = invert(denoiser, x0, schedule.core_sigmas(), method=method, family=schedule.family, **options)
    trajectory = [schedule.from_core(z, i) for i, z in enumerate(result.trajectory)]
    noise = trajectory[-1]
    return DiffusersInversion(noise=noise, latents=pipeline_latents(noise, schedule, kind), trajectory=trajectory,
                              result=result, schedule=schedule, prompt=prompt, negative=denoiser.negative,
                              guidance_scale=guidance_scale, embedded_guidance=denoiser.embedded_guidance,
                              kind=kind)


def sample_latents(model, schedule: Schedule, noise: torch.Tensor, prompt_embeds, *, pooled_prompt_embeds=None,
                   negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, added_cond_kwargs=None,
                   guidance_scale: float = 1.0, embedded_guidance_scale: Optional[float] = None,
                   trajectory: Optional[Sequence[torch.Tensor]] = None,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic sampling (``gnri_core.reconstruct``) from the scheduler sample
    ``noise`` at the schedule's top level down to its clean level; the result is the
    scheduler's final sample (what the pipeline decodes). ``trajectory`` (scheduler
    samples at every level, clean first) and ``mask`` (1 = resample) keep the trajectory
    outside the mask at every step (TurboEdit's background preservation)."""
    kind = model_kind(model)
    prompt = as_prompt(prompt_embeds, pooled_prompt_embeds, added_cond_kwargs)
    negative = as_prompt(negative_prompt_embeds, negative_pooled_prompt_embeds, added_cond_kwargs)
    denoiser = DiffusersDenoiser(model, schedule, prompt, negative, guidance_scale, embedded_guidance_scale,
                                 kind=kind)
    top = schedule.steps
    core_traj = None
    if trajectory is not None:
        core_traj = [schedule.to_core(z, i) for i, z in enumerate(trajectory)][::-1]
        if mask is None:
            raise InversionInputError("trajectory needs a mask (1 = resample, 0 = keep the trajectory)")
    x = reconstruct(denoiser, schedule.to_core(noise, top), schedule.core_sigmas().flip(0),
                    family=schedule.family, trajectory=core_traj, mask=mask)
    return schedule.from_core(x, 0)


def edit_latents(model, inversion: DiffusersInversion, prompt_embeds, *, pooled_prompt_embeds=None,
                 strength: float = 1.0, guidance_scale: Optional[float] = None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, added_cond_kwargs=None,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Prompt-swap edit (TurboEdit / GNRI editing): sample from the inverted noise with the
    target prompt. ``strength`` interpolates the embeddings from the source (0: reproduces
    the input) to the target (1) and beyond. ``guidance_scale``/negative default to the
    inversion's. ``mask`` (broadcastable to the latent, 1 = edit): outside it every step
    keeps the inverted trajectory, so the background is preserved exactly."""
    target = as_prompt(prompt_embeds, pooled_prompt_embeds,
                       added_cond_kwargs if added_cond_kwargs is not None else inversion.prompt.added_cond_kwargs)
    prompt = inversion.prompt.lerp(target, float(strength))
    scale = inversion.guidance_scale if guidance_scale is None else guidance_scale
    negative = as_prompt(negative_prompt_embeds, negative_pooled_prompt_embeds,
                         added_cond_kwargs) or inversion.negative
    return sample_latents(model, inversion.schedule, inversion.noise, prompt, negative_prompt_embeds=negative,
                          guidance_scale=scale, embedded_guidance_scale=inversion.embedded_guidance,
                          trajectory=inversion.trajectory if mask is not None else None, mask=mask)
