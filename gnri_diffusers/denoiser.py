"""``denoise(x, sigma)`` in the core's convention for a diffusers denoiser (UNet, SD3,
Flux), with the prompt (and CFG) batching the pipelines use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gnri_core import InversionInputError

from .schedule import Schedule

MODEL_KINDS = ("unet", "flux", "sd3")
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (guidance-distilled Flux models)

@dataclass
class PromptEmbeds:
    """One prompt's conditioning, named as diffusers pipelines name it.

    embeds:  ``prompt_embeds`` (encoder_hidden_states), (1 or B, L, D).
    pooled:  ``pooled_prompt_embeds`` (SD3/Flux ``pooled_projections``; SDXL UNets:
             ``added_cond_kwargs["text_embeds"]``), (1 or B, P).
    added_cond_kwargs: further UNet ``added_cond_kwargs`` (SDXL ``time_ids``).
    text_ids: Flux ``txt_ids`` (default zeros, as FluxPipeline uses).
    """

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    added_cond_kwargs: Optional[dict] = None
    text_ids: Optional[torch.Tensor] = None

    def zeros_like(self) -> "PromptEmbeds":
        """This prompt zeroed out (the nodes' default negative)."""
        return PromptEmbeds(torch.zeros_like(self.embeds),
                            None if self.pooled is None else torch.zeros_like(self.pooled),
                            self.added_cond_kwargs, self.text_ids)

    def lerp(self, other: "PromptEmbeds", strength: float) -> "PromptEmbeds":
        """self + strength * (other - self) for the embeddings and pooled outputs."""
        if other.embeds.shape != self.embeds.shape:
            raise InversionInputError(f"prompt embeddings: target shape {tuple(other.embeds.shape)} differs "
                                      f"from the source {tuple(self.embeds.shape)}")
        pooled = other.pooled if other.pooled is not None else self.pooled
        if self.pooled is not None and other.pooled is not None:
            pooled = torch.lerp(self.pooled.float(), other.pooled.float(), strength).to(self.pooled.dtype)
        embeds = torch.lerp(self.embeds.float(), other.embeds.float(), strength).to(self.embeds.dtype)
        return PromptEmbeds(embeds, pooled, other.added_cond_kwargs, other.text_ids)


def as_prompt(prompt_embeds, pooled_prompt_embeds=None, added_cond_kwargs=None, text_ids=None):
    if prompt_embeds is None or isinstance(prompt_embeds, PromptEmbeds):
        return prompt_embeds
    return PromptEmbeds(prompt_embeds, pooled_prompt_embeds, added_cond_kwargs, text_ids)


# --------------------------------------------------------------------------- the denoiser

def model_kind(model) -> str:
    """"unet", "flux" or "sd3" from the model's class (its name or a base class's)."""
    for cls in type(model).__mro__:
        name = cls.__name__
        if name.startswith("Flux") and "Transformer" in name:
            return "flux"
        if name.startswith("SD3Transformer"):
            return "sd3"
        if name.startswith("UNet2DCondition"):
            return "unet"
    raise InversionInputError(f"model: {type(model).__name__} is not supported; expected a "
                              "UNet2DConditionModel, FluxTransformer2DModel or SD3Transformer2DModel")


def pack_flux(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline's packing."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise InversionInputError(f"latent: Flux needs even latent height and width, got {h}x{w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux` for a (h, w) latent."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FluxPipeline's latent image ids for an (h, w) latent: (h/2 * w/2, 3) = (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _batch(t: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if t is None or t.shape[0] == batch:
        return t
    if t.shape[0] != 1:
        raise InversionInputError(f"prompt embeddings: batch {t.shape[0]} does not match the latent batch {batch}")
    return t.expand(batch, *t.shape[1:])


class DiffusersDenoiser:
    """``denoise(x, sigma)`` in the core's convention for a diffusers denoiser.

    ``model``: ``UNet2DConditionModel``, ``FluxTransformer2DModel`` or
    ``SD3Transformer2DModel`` (latents (B, C, H, W); Flux is packed/unpacked here).
    ``prompt``/``negative``: :class:`PromptEmbeds`. CFG (``guidance_scale`` != 1) runs
    the negative and the prompt in one batch, [negative, prompt], and combines the model
    outputs as pipelines do. ``embedded_guidance`` feeds Flux-dev's guidance embedding.
    ``nfe`` counts model calls (a CFG batch is one call).
    """

    def __init__(self, model, schedule: Schedule, prompt: PromptEmbeds, negative: Optional[PromptEmbeds] = None,
                 guidance_scale: float = 1.0, embedded_guidance: Optional[float] = None,
                 kind: Optional[str] = None):
        self.model = model
        self.schedule = schedule
        self.prompt = prompt
        self.cfg = float(guidance_scale) != 1.0
        self.negative = (negative if negative is not None else prompt.zeros_like()) if self.cfg else None
        self.guidance_scale = float(guidance_scale)
        self.kind = kind or model_kind(model)
        if self.kind not in MODEL_KINDS:
            raise InversionInputError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.kind in ("flux", "sd3") and schedule.kind != "flow":
            raise InversionInputError(f"model: a {self.kind} transformer needs a flow-matching scheduler")
        if self.kind == "unet" and schedule.kind == "flow":
            raise InversionInputError("model: a UNet needs a DDIM or Euler scheduler, not a flow-matching one")
        config = getattr(model, "config", {}) or {}
        if self.kind != "flux" or not config.get("guidance_embeds", False):
            embedded_guidance = None  # only guidance-distilled Flux models (dev) embed it
        elif embedded_guidance is None:
            embedded_guidance = FLUX_GUIDANCE
        self.embedded_guidance = embedded_guidance
        self.nfe = 0

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.model, "dtype", torch.float32)

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", torch.device("cpu"))

    # -- model call
    def model_output(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The (CFG-combined) raw model output for the model input ``x_in`` at timesteps ``t``."""
        batch = x_in.shape[0]
        prompts = [self.prompt] if not self.cfg else [self.negative, self.prompt]
        x_all = torch.cat([x_in] * len(prompts)).to(device=self.device, dtype=self.dtype)
        t_all = torch.cat([t] * len(prompts)).to(self.device)
        self.nfe += 1
        out = self._call(x_all, t_all, prompts, batch).float().to(x_in.device)
        if self.cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    def _cat(self, prompts, attr, batch):
        values = [_batch(getattr(p, attr), batch) for p in prompts]
        if any(v is None for v in values):
            return None
        return torch.cat(values).to(device=self.device, dtype=self.dtype)

    def _call(self, x, t, prompts, batch):
        embeds = self._cat(prompts, "embeds", batch)
        pooled = self._cat(prompts, "pooled", batch)
        if self.kind == "unet":
            added = dict(prompts[-1].added_cond_kwargs or {})
            for key in list(added):
                parts = [(p.added_cond_kwargs or {}).get(key, added[key]) for p in prompts]
                added[key] = torch.cat([_batch(v, batch) for v in parts]).to(self.device)
            if pooled is not None and "text_embeds" not in added:
                added["text_embeds"] = pooled
            kwargs = {"added_cond_kwargs": added} if added else {}
            return self.model(x, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
        if self.kind == "sd3":
            return self.model(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                              pooled_projections=pooled, return_dict=False)[0]
        h, w = x.shape[-2:]
        text_ids = prompts[-1].text_ids
        if text_ids is None:
            text_ids = torch.zeros(embeds.shape[1], 3)
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((x.shape[0],), float(self.embedded_guidance), device=self.device,
                                  dtype=torch.float32)
        out = self.model(hidden_states=pack_flux(x), timestep=(t.to(self.dtype) / 1000), guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=embeds,
                         txt_ids=text_ids.to(device=self.device, dtype=self.dtype),
                         img_ids=flux_image_ids(h, w, self.device, self.dtype), return_dict=False)[0]
        return unpack_flux(out, h, w)

    # -- the core's denoise
    @staticmethod
    def batch_sigmas(x: torch.Tensor, sigma) -> torch.Tensor:
        """``sigma`` (a number, (1,) or (B,)) as (B,) float64 on the CPU."""
        sig = torch.as_tensor(sigma).detach().double().cpu().flatten()
        return sig.expand(x.shape[0]) if sig.numel() == 1 else sig

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sched = self.schedule
        sig = self.batch_sigmas(x, sigma)
        t = sched.timestep_of(sig)
        shape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.float()
        s = sig.to(device=x.device, dtype=torch.float32).view(shape)
        if sched.family == "flow":
            v = self.model_output(xf, t)
            return (xf - s * v).to(x.dtype)
        c_in = 1.0 / (s ** 2 + 1).sqrt()
        out = self.model_output(xf * c_in, t)
        if sched.prediction == "epsilon":
            denoised = xf - s * out
        elif sched.prediction == "v_prediction":
            denoised = xf * c_in ** 2 - out * s * c_in
        else:
            denoised = out
        return denoised.to(x.dtype)
