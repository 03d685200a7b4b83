"""diffusers interop: invert and edit with diffusers denoisers through ``gnri_core``.

An optional extra (``pip install comfyui-gnri[diffusers]``): ``gnri_core/__init__.py``
and the ComfyUI nodes never import this module, so the core stays torch-only.

    from gnri_core.diffusers_adapter import edit_latents, invert_latents, sample_latents

    inv = invert_latents(pipe.unet, pipe.scheduler, latents, prompt_embeds,
                         num_inference_steps=50)                  # method="gnri"
    image_latents = sample_latents(pipe.unet, inv.schedule, inv.noise, prompt_embeds)
    edited = edit_latents(pipe.unet, inv, target_prompt_embeds)   # prompt swap
    pipe(prompt_embeds=..., latents=inv.latents, num_inference_steps=50)  # diffusers' own loop

Conventions. The core works in ComfyUI's sigma space (EPS/V: x = x0 + sigma*eps; flow:
x = (1 - sigma)*x0 + sigma*eps) and calls ``denoise(x, sigma)`` for the x0-prediction.
A :class:`Schedule` maps the scheduler's levels to that space:

* DDIM (``DDIMScheduler``/``DDIMInverseScheduler``): sigma = sqrt((1 - abar)/abar); the
  scheduler's sample is sqrt(abar)*x ("scaled" space), converted on the way in and out.
  The clean level is the scheduler's final alpha (``set_alpha_to_one=False``: sigma > 0).
* Euler (``EulerDiscreteScheduler``): the scheduler's sample is already x; the model
  sees x/sqrt(sigma^2 + 1) (``scale_model_input``).
* Flow (``FlowMatchEulerDiscreteScheduler``): the sample is x; the model predicts the
  velocity v, D = x - sigma*v.

The model is called with the scheduler's own timestep for each level, so sampling with
``reconstruct``/:func:`sample_latents` is diffusers' DDIM (eta = 0) / Euler /
FlowMatchEuler sampling to float tolerance. The core's naive ``ddim`` inversion
evaluates the model at the target level (timestep and input scaling of sigma_{i+1});
diffusers' ``DDIMInverseScheduler`` feeds the model the lower-level latent at its own
scale (and converts v-predictions with the lower level's alpha) with the target
timestep: ``convention="ddim_inverse"`` makes the denoiser do the same, so
``invert(..., method="ddim")`` reproduces ``DDIMInverseScheduler`` exactly (use it with
``method="ddim"`` only; exact-root methods use the default ``"core"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import InversionInputError
from .invert import check_latent, invert, reconstruct
from .result import InversionResult

KINDS = ("ddim", "euler", "flow")
CONVENTIONS = ("core", "ddim_inverse")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
MODEL_KINDS = ("unet", "flux", "sd3")


# --------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class Schedule:
    """A diffusers scheduler's sampling levels in the core's sigma space.

    kind:        "ddim", "euler" or "flow".
    prediction:  "epsilon", "v_prediction", "sample" (DDIM/Euler) or "flow" (velocity).
    sigmas:      ascending float64 sigmas, ``sigmas[0]`` the clean level the scheduler
                 ends at, ``sigmas[-1]`` the level it starts from.
    timesteps:   the model timestep at every level (``nan`` where diffusers never calls
                 the model: the clean level).
    init_noise_sigma: the scheduler's ``init_noise_sigma`` (pipelines multiply the
                 ``latents`` argument by it).
    num_train_timesteps, train_sigmas: for timesteps of sigmas outside the schedule.
    """

    kind: str
    prediction: str
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float = 1.0
    num_train_timesteps: int = 1000
    train_sigmas: Optional[torch.Tensor] = None
    continuous_timesteps: bool = False  # Euler timestep_type="continuous": t = 0.25 log(sigma)

    @property
    def family(self) -> str:
        """The core's model family: "flow" or "eps" (EPS and V-prediction)."""
        return "flow" if self.kind == "flow" else "eps"

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def core_sigmas(self) -> torch.Tensor:
        """Ascending float32 sigmas for ``gnri_core.invert`` (flip for ``reconstruct``)."""
        return self.sigmas.float()

    def sample_scale(self, level: int) -> float:
        """Scheduler sample = scale * core latent at ``level`` (DDIM: sqrt(abar))."""
        if self.kind != "ddim":
            return 1.0
        return 1.0 / math.sqrt(1.0 + float(self.sigmas[level]) ** 2)

    def to_core(self, sample: torch.Tensor, level: int = 0) -> torch.Tensor:
        """A scheduler sample at ``level`` -> the core's latent (float32)."""
        return sample.float() / self.sample_scale(level)

    def from_core(self, z: torch.Tensor, level: int = -1) -> torch.Tensor:
        """The core's latent at ``level`` -> the scheduler's sample (float32)."""
        return z.float() * self.sample_scale(level % len(self.sigmas))

    def level_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the schedule level of every sigma (B,), -1 where none matches."""
        sigma = sigma.detach().double().cpu().flatten()
        table = self.sigmas
        diff = (sigma[:, None] - table[None, :]).abs()
        idx = diff.argmin(dim=1)
        tol = 1e-5 * table[idx].abs().clamp_min(1e-3)
        return torch.where(diff.gather(1, idx[:, None]).squeeze(1) <= tol, idx, torch.full_like(idx, -1))

    def timestep_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model timestep for every sigma (B,), float32: the scheduler's own timestep
        on its levels, else interpolated in log-sigma (flow: sigma * num_train_timesteps)."""
        sigma = sigma.detach().double().cpu().flatten()
        idx = self.level_of(sigma)
        out = torch.empty_like(sigma)
        for b in range(len(sigma)):
            t = float(self.timesteps[idx[b]]) if idx[b] >= 0 else float("nan")
            if math.isnan(t):
                t = self._interpolate_timestep(float(sigma[b]))
            out[b] = t
        return out.float()

    def _interpolate_timestep(self, sigma: float) -> float:
        if self.kind == "flow":
            return sigma * self.num_train_timesteps
        if self.continuous_timesteps:
            return 0.25 * math.log(max(sigma, 1e-10))
        if self.train_sigmas is None:
            raise InversionInputError(f"sigma {sigma:.6g} is not on the schedule and the scheduler "
                                      "has no training sigmas to interpolate a timestep from")
        log_sigmas = self.train_sigmas.log()
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(torch.clamp((log_sigmas <= log_sigma).sum() - 1, 0, len(log_sigmas) - 2))
        lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
        w = min(max((log_sigma - lo) / (hi - lo), 0.0), 1.0)
        return low + w


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("gnri_core.diffusers_adapter needs diffusers: "
                          "pip install 'comfyui-gnri[diffusers]' (or pip install diffusers)") from exc
    return diffusers


def _fresh(scheduler):
    """A scheduler of the same class and config, so set_timesteps leaves the caller's alone."""
    return type(scheduler).from_config(scheduler.config)


def _check_prediction(config, allowed=("epsilon", "v_prediction", "sample")) -> str:
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in allowed:
        raise InversionInputError(f"scheduler: prediction_type {prediction!r} is not supported; "
                                  f"expected one of {allowed}")
    return prediction


def make_schedule(scheduler, num_inference_steps: int, *, sigmas: Optional[Sequence[float]] = None,
                  mu: Optional[float] = None, image_seq_len: Optional[int] = None,
                  timesteps: Optional[Sequence[float]] = None) -> Schedule:
    """The :class:`Schedule` a pipeline samples with ``scheduler`` and ``num_inference_steps``.

    Supported: ``DDIMScheduler``/``DDIMInverseScheduler`` (spacing "leading"/"trailing",
    or any spacing whose steps chain), ``EulerDiscreteScheduler`` and
    ``FlowMatchEulerDiscreteScheduler``. ``sigmas``/``mu``/``timesteps`` go to
    ``set_timesteps`` (flow; ``mu`` is computed from ``image_seq_len`` as the Flux/SD3
    pipelines do when the config uses dynamic shifting). The caller's scheduler is not
    modified.
    """
    _require_diffusers()
    name = type(scheduler).__name__
    steps = int(num_inference_steps)
    if steps < 1:
        raise InversionInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if name in ("DDIMScheduler", "DDIMInverseScheduler"):
        return _ddim_schedule(scheduler, steps)
    if name == "EulerDiscreteScheduler":
        return _euler_schedule(scheduler, steps, sigmas=sigmas, timesteps=timesteps)
    if name == "FlowMatchEulerDiscreteScheduler":
        return _flow_schedule(scheduler, steps, sigmas=sigmas, mu=mu, image_seq_len=image_seq_len,
                              timesteps=timesteps)
    raise InversionInputError(
        f"scheduler: {name} is not supported; use DDIMScheduler (or DDIMInverseScheduler), "
        "EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler (e.g. "
        "DDIMScheduler.from_config(pipe.scheduler.config))")


def _ddim_schedule(scheduler, steps: int) -> Schedule:
    from diffusers import DDIMScheduler

    config = scheduler.config
    for flag in ("clip_sample", "thresholding"):
        if config.get(flag, False):
            raise InversionInputError(
                f"scheduler: {flag}=True clips the x0-prediction, which makes the DDIM step "
                f"non-invertible; build the scheduler with {flag}=False (as SD pipelines do)")
    prediction = _check_prediction(config)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    descending = [int(t) for t in sched.timesteps]
    ratio = sched.config.num_train_timesteps // steps
    for t, t_next in zip(descending[:-1], descending[1:], strict=True):
        if t - ratio != t_next:  # DDIMScheduler steps from t to t - ratio, then evaluates t_next
            raise InversionInputError(
                f"scheduler: with timestep_spacing={config.get('timestep_spacing')!r} and {steps} steps "
                f"the DDIM steps do not chain (t={t} steps to {t - ratio} but the next step "
                f"evaluates {t_next}); use 'leading' or 'trailing' with a step count dividing "
                f"{sched.config.num_train_timesteps}")
    abar = sched.alphas_cumprod.double()
    last = descending[-1] - ratio
    clean = float(abar[last]) if last >= 0 else float(sched.final_alpha_cumprod)
    levels = [clean] + [float(abar[t]) for t in reversed(descending)]
    alphas = torch.tensor(levels, dtype=torch.float64)
    sigmas = ((1 - alphas) / alphas).sqrt()
    if not torch.isfinite(sigmas).all():
        raise InversionInputError("scheduler: a level has alpha_cumprod = 0 (zero terminal SNR): "
                                  "infinite sigma, which the DDIM step cannot invert")
    timesteps = torch.tensor([float(last) if last >= 0 else float("nan")]
                             + [float(t) for t in reversed(descending)], dtype=torch.float64)
    train_sigmas = ((1 - abar) / abar).sqrt()
    return Schedule("ddim", prediction, sigmas, timesteps, float(sched.init_noise_sigma),
                    int(sched.config.num_train_timesteps), train_sigmas)


def _euler_schedule(scheduler, steps: int, sigmas=None, timesteps=None) -> Schedule:
    prediction = _check_prediction(scheduler.config)
    sched = _fresh(scheduler)
    kwargs = {}
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
    elif timesteps is not None:
        kwargs["timesteps"] = list(timesteps)
    else:
        kwargs["num_inference_steps"] = steps
    sched.set_timesteps(**kwargs)
    down = sched.sigmas.double().cpu()
    ts = sched.timesteps.double().cpu()
    ascending = down.flip(0)
    levels_t = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), ts.flip(0)])
    abar = sched.alphas_cumprod.double()
    train_sigmas = ((1 - abar) / abar).sqrt()
    continuous = sched.config.get("timestep_type", "discrete") == "continuous"
    return Schedule("euler", prediction, ascending, levels_t, float(sched.init_noise_sigma),
                    int(sched.config.num_train_timesteps), train_sigmas, continuous)


def flow_mu(config, image_seq_len: int) -> float:
    """Resolution-dependent shift mu, as the Flux/SD3 pipelines compute it."""
    base_seq, max_seq = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return image_seq_len * m + (base_shift - m * base_seq)


def _flow_schedule(scheduler, steps: int, sigmas=None, mu=None, image_seq_len=None, timesteps=None) -> Schedule:
    config = scheduler.config
    for flag in ("stochastic_sampling", "invert_sigmas"):
        if config.get(flag, False):
            raise InversionInputError(f"scheduler: {flag}=True is not a deterministic Euler flow "
                                      "sampler this adapter can invert")
    sched = _fresh(scheduler)
    kwargs = {}
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            if image_seq_len is None:
                raise InversionInputError("scheduler: use_dynamic_shifting needs mu (or the latent "
                                          "size, from which mu is computed as pipelines do)")
            mu = flow_mu(config, image_seq_len)
        kwargs["mu"] = mu
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
    if timesteps is not None:
        kwargs["timesteps"] = list(timesteps)
    if sigmas is None and timesteps is None:
        kwargs["num_inference_steps"] = steps
    sched.set_timesteps(**kwargs)
    ascending = sched.sigmas.double().cpu().flip(0)
    ts = sched.timesteps.double().cpu()
    levels_t = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), ts.flip(0)])
    return Schedule("flow", "flow", ascending, levels_t, float(getattr(sched, "init_noise_sigma", 1.0)),
                    int(config.get("num_train_timesteps", 1000)))


# --------------------------------------------------------------------------- prompts

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
    ``convention``: "core" (default) or "ddim_inverse" (see the module docstring).
    ``nfe`` counts model calls (a CFG batch is one call).
    """

    def __init__(self, model, schedule: Schedule, prompt: PromptEmbeds, negative: Optional[PromptEmbeds] = None,
                 guidance_scale: float = 1.0, embedded_guidance: Optional[float] = None,
                 convention: str = "core", kind: Optional[str] = None):
        if convention not in CONVENTIONS:
            raise InversionInputError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
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
            embedded_guidance = 3.5  # FluxPipeline's default guidance_scale
        self.embedded_guidance = embedded_guidance
        self.convention = convention
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
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sched = self.schedule
        sig = torch.as_tensor(sigma).detach().double().cpu().flatten()
        if sig.numel() == 1 and x.shape[0] > 1:
            sig = sig.expand(x.shape[0])
        t = sched.timestep_of(sig)
        scale_sigma = sig
        if self.convention == "ddim_inverse" and sched.family == "eps":
            idx = sched.level_of(sig)
            if (idx <= 0).any():
                raise InversionInputError("convention='ddim_inverse': sigma must be a schedule level above the "
                                          "clean one (use it with invert(..., method='ddim') only)")
            scale_sigma = sched.sigmas[idx - 1]
        shape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.float()
        s = sig.to(device=x.device, dtype=torch.float32).view(shape)
        if sched.family == "flow":
            v = self.model_output(xf, t)
            return (xf - s * v).to(x.dtype)
        s_in = scale_sigma.to(device=x.device, dtype=torch.float32).view(shape)
        c_in = 1.0 / (s_in ** 2 + 1).sqrt()
        out = self.model_output(xf * c_in, t)
        if self.convention == "core":  # the usual conversions at the evaluated level
            if sched.prediction == "epsilon":
                denoised = xf - s * out
            elif sched.prediction == "v_prediction":
                denoised = xf * c_in ** 2 - out * s * c_in
            else:
                denoised = out
            return denoised.to(x.dtype)
        # DDIMInverseScheduler: eps from the lower level, the step to the target level
        if sched.prediction == "epsilon":
            eps = out
        elif sched.prediction == "v_prediction":
            eps = c_in * out + s_in * c_in ** 2 * xf
        else:
            eps = (xf - out) / s_in
        return (xf - s * eps).to(x.dtype)


# --------------------------------------------------------------------------- high level

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
    extra: dict = field(default_factory=dict)


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
                   convention: str = "core", schedule: Optional[Schedule] = None, sigmas=None,
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
    if convention == "ddim_inverse" and method != "ddim":
        raise InversionInputError("convention='ddim_inverse' reproduces DDIMInverseScheduler's naive step; use it "
                                  f"only with method='ddim' (got method={method!r})")
    kind = model_kind(model)
    prompt = as_prompt(prompt_embeds, pooled_prompt_embeds, added_cond_kwargs)
    negative = as_prompt(negative_prompt_embeds, negative_pooled_prompt_embeds, added_cond_kwargs)
    schedule = _schedule_for(model, scheduler, latents, num_inference_steps, schedule, sigmas, mu, kind)
    denoiser = DiffusersDenoiser(model, schedule, prompt, negative, guidance_scale, embedded_guidance_scale,
                                 convention, kind)
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
                                 "core", kind)
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


__all__ = [
    "Schedule", "make_schedule", "flow_mu", "PromptEmbeds", "DiffusersDenoiser", "DiffusersInversion",
    "invert_latents", "sample_latents", "edit_latents", "pipeline_latents", "model_kind",
    "pack_flux", "unpack_flux", "flux_image_ids", "KINDS", "CONVENTIONS",
]
