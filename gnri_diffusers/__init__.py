"""gnri_diffusers: invert and edit with diffusers models through ``gnri_core``.

The diffusers host adapter, as ``nodes/`` is ComfyUI's: it depends on ``gnri_core``,
never the other way round. An optional extra (``pip install "comfyui-gnri[diffusers]"``).

    from gnri_diffusers import edit_latents, invert_latents, sample_latents

    inv = invert_latents(pipe.unet, pipe.scheduler, latents, prompt_embeds,
                         num_inference_steps=50)                  # method="gnri"
    image_latents = sample_latents(pipe.unet, inv.schedule, inv.noise, prompt_embeds)
    edited = edit_latents(pipe.unet, inv, target_prompt_embeds)   # prompt swap
    pipe(prompt_embeds=..., latents=inv.latents, num_inference_steps=50)  # diffusers' own loop

Conventions. The core works in ComfyUI's sigma space (EPS/V: x = x0 + sigma*eps; flow:
x = (1 - sigma)*x0 + sigma*eps) and calls ``denoise(x, sigma)`` for the x0-prediction.
``schedule.Schedule`` maps a scheduler's levels to that space (DDIM: the sample is
sqrt(abar)*x; Euler: the sample is x, the model sees x/sqrt(sigma^2 + 1); flow: the
model predicts the velocity v, D = x - sigma*v); ``denoiser.DiffusersDenoiser`` calls
the model with the scheduler's own timestep for each level, so sampling with
``reconstruct``/:func:`sample_latents` is diffusers' DDIM (eta = 0) / Euler /
FlowMatchEuler sampling to float tolerance; ``api`` holds the functions below.
"""
from .api import DiffusersInversion, edit_latents, invert_latents, pipeline_latents, sample_latents
from .denoiser import (DiffusersDenoiser, PromptEmbeds, flux_image_ids, model_kind, pack_flux,
                       unpack_flux)
from .schedule import Schedule, flow_mu, make_schedule

__all__ = [
    "Schedule", "make_schedule", "flow_mu", "PromptEmbeds", "DiffusersDenoiser", "DiffusersInversion",
    "invert_latents", "sample_latents", "edit_latents", "pipeline_latents", "model_kind",
    "pack_flux", "unpack_flux", "flux_image_ids",
]
