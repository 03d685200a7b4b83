"""diffusers-side cases shared by ``tests/test_diffusers.py`` and
``bench/diffusers_check.py``: tiny, randomly initialised diffusers models (CPU, seeded,
built from configs: no downloads), diffusers' own sampling and inversion loops as the
pipelines run them, and the comparisons (cross-check, reconstruction, ComfyUI vs
diffusers on the same weights). Needs diffusers."""
from __future__ import annotations

import torch
from diffusers import (
    DDIMInverseScheduler, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import gnri_diffusers as gd
from gnri_core import invert

# --------------------------------------------------------------------------- tiny models

# The UNet of gnri_testing/tiny_models.py (ComfyUI's UNET_CONFIG; SD15's num_heads 8) in diffusers'
# terms (SD1.5 configs' ``attention_head_dim`` is the head count).
UNET_KWARGS = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False,
)
# gnri_testing/tiny_models.py's Flux (hidden 64, 2 heads of 32, rope axes 8/12/12, 16 latent
# channels, text/pooled width 32) with diffusers' fixed mlp_ratio 4.
FLUX_KWARGS = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   guidance_embeds=False, axes_dims_rope=(8, 12, 12))
SD3_KWARGS = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                  caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=32)

# SD1.5's scheduler (DDIM: clip_sample off as SD pipelines set it), an SD2-v-like one.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DDIM_CONFIGS = {
    "eps": dict(SD_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                steps_offset=1, timestep_spacing="leading"),
    "v": dict(SD_SCHEDULE, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
              steps_offset=0, timestep_spacing="trailing"),
}
EULER_CONFIGS = {
    "eps": dict(SD_SCHEDULE, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading"),
    "v": dict(SD_SCHEDULE, prediction_type="v_prediction", timestep_spacing="linspace", use_karras_sigmas=True),
}
FLOW_CONFIGS = {
    "flux": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096),
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
}
STEPS = 10
CFG = 3.0


class SkipUNet(UNet2DConditionModel):
    """``UNet2DConditionModel`` plus ``skip * sample`` on its output, as
    ``gnri_testing/tiny_models.TinySkipUNet``: a random UNet's noise guess is uncorrelated with
    its input, so EPS sampling would never remove the noise; with the skip
    eps(x) ~ x / sqrt(1 + sigma^2) plus a small random, prompt-dependent part."""

    skip = 0.0

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        out = super().forward(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        if self.skip:
            out = out + self.skip * sample
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def seeded(build, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_unet(family: str = "eps", seed: int = 0) -> SkipUNet:
    """eps: skip 1 (as tiny_models' EPS model), v: no skip; the last conv's weights scaled
    by 0.2 (as tiny_models keeps the random part of the output small)."""
    unet = seeded(lambda: SkipUNet(**UNET_KWARGS), seed)
    unet.skip = 1.0 if family == "eps" else 0.0
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
    return unet.eval().requires_grad_(False)


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    return seeded(lambda: FluxTransformer2DModel(**FLUX_KWARGS), seed).eval().requires_grad_(False)


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    return seeded(lambda: SD3Transformer2DModel(**SD3_KWARGS), seed).eval().requires_grad_(False)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unet_prompts(seed=0):
    """(prompt_embeds, negative_prompt_embeds): (1, 8, 768), unit scale."""
    return randn(1, 8, 768, seed=seed), randn(1, 8, 768, seed=seed + 100)


def flow_prompts(seed=0):
    """((embeds (1, 8, 32), pooled (1, 32)), (negative embeds, negative pooled))."""
    return (randn(1, 8, 32, seed=seed), randn(1, 32, seed=seed + 1)), \
        (randn(1, 8, 32, seed=seed + 100), randn(1, 32, seed=seed + 101))


def latents_for(kind: str, seed=0, size=16):
    """Clean latents in the scheduler's space (what VAE encoding x scaling factor gives)."""
    channels = 16 if kind == "flux" else 4
    return randn(1, channels, size, size, seed=seed + 7)


# --------------------------------------------------------------------------- diffusers' own loops

def _call(model, sample, t, prompt, negative, guidance_scale):
    """One model call as the pipelines make it: [negative, prompt] in one batch for CFG."""
    embeds, pooled = prompt if isinstance(prompt, tuple) else (prompt, None)
    cfg = guidance_scale != 1.0
    if cfg:
        n_embeds, n_pooled = negative if isinstance(negative, tuple) else (negative, None)
        embeds = torch.cat([n_embeds, embeds])
        pooled = None if pooled is None else torch.cat([n_pooled, pooled])
    batch = 2 if cfg else 1
    x = torch.cat([sample] * batch)
    if isinstance(model, UNet2DConditionModel):
        out = model(x, t, encoder_hidden_states=embeds).sample
    elif isinstance(model, SD3Transformer2DModel):
        out = model(hidden_states=x, timestep=t.expand(batch), encoder_hidden_states=embeds,
                    pooled_projections=pooled).sample
    else:  # Flux: packed latents, timestep / 1000, ids as FluxPipeline makes them
        h, w = x.shape[-2:]
        packed = gd.pack_flux(x)
        out = model(hidden_states=packed, timestep=t.expand(batch).to(x.dtype) / 1000, guidance=None,
                    pooled_projections=pooled, encoder_hidden_states=embeds,
                    txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=gd.flux_image_ids(h, w)).sample
        out = gd.unpack_flux(out, h, w)
    if cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return out


def flow_set_timesteps(scheduler, model, steps, size):
    """As FluxPipeline / SD3Pipeline call set_timesteps."""
    kwargs = {}
    if scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        kwargs["mu"] = calculate_shift((size // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                       c.max_shift)
    if isinstance(model, FluxTransformer2DModel):
        kwargs["sigmas"] = torch.linspace(1.0, 1.0 / steps, steps).tolist()
        scheduler.set_timesteps(**kwargs)
    else:
        scheduler.set_timesteps(steps, **kwargs)


@torch.no_grad()
def diffusers_sample(model, scheduler, noise, prompt, negative=None, guidance_scale=1.0, steps=STEPS):
    """The pipelines' denoising loop with ``scheduler`` (DDIM: eta = 0), from ``noise``
    (the scheduler's sample at its first timestep)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        flow_set_timesteps(scheduler, model, steps, noise.shape[-1])
    else:
        scheduler.set_timesteps(steps)
    latents = noise
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        out = _call(model, model_input, t, prompt, negative, guidance_scale)
        kwargs = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
        latents = scheduler.step(out, t, latents, **kwargs).prev_sample
    return latents


@torch.no_grad()
def diffusers_ddim_invert(model, config, latents, prompt, negative=None, guidance_scale=1.0, steps=STEPS):
    """DDIMInverseScheduler inversion, as diffusers' DiffEdit / Pix2Pix-Zero pipelines run it.
    Returns the latents at every level (clean first)."""
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(steps)
    trajectory = [latents]
    for t in inverse.timesteps:
        out = _call(model, latents, t, prompt, negative, guidance_scale)
        latents = inverse.step(out, t, latents).prev_sample
        trajectory.append(latents)
    return trajectory


@torch.no_grad()
def diffusers_reverse_step_invert(model, scheduler, latents, prompt, negative=None, guidance_scale=1.0,
                                  steps=STEPS):
    """Euler / FlowMatchEuler inversion with the scheduler's own code: each step is the
    scheduler's ``step`` at the target timestep t_{i+1}, applied to the current latent,
    with the time direction reversed. Returns the latents at every level (clean first)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        flow_set_timesteps(scheduler, model, steps, latents.shape[-1])
    else:
        scheduler.set_timesteps(steps)
    trajectory = [latents]
    for t in scheduler.timesteps.flip(0):
        scheduler._step_index = None  # step() looks the level up from t
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        scheduler._step_index = None
        out = _call(model, model_input, t, prompt, negative, guidance_scale)
        forward = scheduler.step(out, t, latents).prev_sample
        latents = 2 * latents - forward
        trajectory.append(latents)
    return trajectory


# --------------------------------------------------------------------------- cases

# (model case, scheduler): ("eps"|"v", "ddim"|"euler") for the UNet, ("flux"|"sd3", "flow")
CASES = [("eps", "ddim"), ("v", "ddim"), ("eps", "euler"), ("v", "euler"), ("flux", "flow"), ("sd3", "flow")]
CASE_IDS = [f"{scheduler}-{case}" for case, scheduler in CASES]


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_case(case, scheduler_name):
    """-> model, make_scheduler, scheduler config, clean latents, prompt, negative, where
    prompt/negative are (embeds, pooled or None)."""
    if scheduler_name == "flow":
        model = tiny_flux() if case == "flux" else tiny_sd3()
        prompt, negative = flow_prompts()
        config = FLOW_CONFIGS[case]
        return model, (lambda: FlowMatchEulerDiscreteScheduler(**config)), config, latents_for(case), prompt, negative
    model = tiny_unet(case)
    pos, neg = unet_prompts()
    config = (DDIM_CONFIGS if scheduler_name == "ddim" else EULER_CONFIGS)[case]
    cls = DDIMScheduler if scheduler_name == "ddim" else EulerDiscreteScheduler
    return model, (lambda: cls(**config)), config, latents_for("unet"), (pos, None), (neg, None)


def adapter_kwargs(prompt, negative, guidance_scale):
    return dict(prompt_embeds=prompt[0], pooled_prompt_embeds=prompt[1], negative_prompt_embeds=negative[0],
                negative_pooled_prompt_embeds=negative[1], guidance_scale=guidance_scale)


def as_diffusers(p):
    return p if p[1] is not None else p[0]


def diffusers_invert(model, scheduler_name, make, config, x, p, n, guidance_scale, steps):
    """diffusers' inversion of the case: DDIMInverseScheduler, else the reversed scheduler step."""
    if scheduler_name == "ddim":
        return diffusers_ddim_invert(model, config, x, p, n, guidance_scale, steps)
    return diffusers_reverse_step_invert(model, make(), x, p, n, guidance_scale, steps)


class DDIMInverseDenoiser(gd.DiffusersDenoiser):
    """The evaluation ``DDIMInverseScheduler`` makes, as a denoiser for the core's naive
    ``ddim`` step: the model sees the latent at the level below the target at that level's
    scale (and converts v-predictions with its alpha), with the target timestep; the eps
    it implies is then used at the target level. DDIM schedules only."""

    def __call__(self, x, sigma):
        sched = self.schedule
        sig = self.batch_sigmas(x, sigma)
        shape = (-1,) + (1,) * (x.ndim - 1)
        s = sig.float().view(shape)
        s_in = sched.sigmas[sched.level_of(sig) - 1].float().view(shape)
        c_in = 1.0 / (s_in ** 2 + 1).sqrt()
        out = self.model_output(x.float() * c_in, sched.timestep_of(sig))
        if sched.prediction == "epsilon":
            eps = out
        elif sched.prediction == "v_prediction":
            eps = c_in * out + s_in * c_in ** 2 * x
        else:
            eps = (x - out) / s_in
        return x - s * eps


def cross_check(case, scheduler_name, guidance_scale=CFG, steps=STEPS) -> dict:
    """The core's ``ddim`` through the adapter against diffusers' inversion (max abs
    difference over the whole trajectory), ``sample_latents`` (the core's ``reconstruct``)
    against diffusers' sampling loop from the same noise, and the latents' scale."""
    model, make, config, x, prompt, negative = make_case(case, scheduler_name)
    p, n = as_diffusers(prompt), as_diffusers(negative)
    theirs = diffusers_invert(model, scheduler_name, make, config, x, p, n, guidance_scale, steps)
    if scheduler_name == "ddim":
        schedule = gd.make_schedule(make(), steps)
        denoiser = DDIMInverseDenoiser(model, schedule, gd.PromptEmbeds(*prompt), gd.PromptEmbeds(*negative),
                                       guidance_scale)
        result = invert(denoiser, schedule.to_core(x, 0), schedule.core_sigmas(), method="ddim",
                        family=schedule.family)
        trajectory = [schedule.from_core(z, i) for i, z in enumerate(result.trajectory)]
    else:
        ours = gd.invert_latents(model, make(), x, num_inference_steps=steps, method="ddim",
                                 **adapter_kwargs(prompt, negative, guidance_scale))
        schedule, result, trajectory = ours.schedule, ours.result, ours.trajectory
    assert result.nfe == steps and len(trajectory) == len(theirs) == steps + 1
    sampled = diffusers_sample(model, make(), theirs[-1], p, n, guidance_scale, steps)
    ours_sampled = gd.sample_latents(model, schedule, theirs[-1], **adapter_kwargs(prompt, negative, guidance_scale))
    return {"inversion": max(max_diff(a, b) for a, b in zip(trajectory, theirs, strict=True)),
            "sampling": max_diff(ours_sampled, sampled),
            "scale": max(float(z.abs().max()) for z in theirs + [sampled])}


def reconstruction_errors(case, scheduler_name, guidance_scale=1.0, steps=STEPS, **options) -> dict:
    """Relative error ||x_rec - x|| / ||x|| of diffusers' own sampling loop (same prompt,
    schedule, guidance) from (a) gnri's inverted noise (through the adapter), (b) diffusers'
    inversion's noise; and gnri's model calls."""
    model, make, config, x, prompt, negative = make_case(case, scheduler_name)
    p, n = as_diffusers(prompt), as_diffusers(negative)
    theirs = diffusers_invert(model, scheduler_name, make, config, x, p, n, guidance_scale, steps)
    ours = gd.invert_latents(model, make(), x, num_inference_steps=steps, method="gnri",
                             **adapter_kwargs(prompt, negative, guidance_scale), **options)
    return {"gnri": rel_err(diffusers_sample(model, make(), ours.noise, p, n, guidance_scale, steps), x),
            "diffusers": rel_err(diffusers_sample(model, make(), theirs[-1], p, n, guidance_scale, steps), x),
            "nfe": ours.result.nfe}


# --------------------------------------------------------------------------- ComfyUI, same weights

def _comfy_unet_from_diffusers(unet):
    """gnri_testing/tiny_models' ComfyUI UNet (TinySkipUNet, skip 1) with the diffusers UNet's
    weights, through ComfyUI's own diffusers-key map ``comfy.utils.unet_to_diffusers``."""
    import comfy.model_base
    import comfy.utils
    from . import tiny_models

    patcher = tiny_models._tiny_unet(comfy.model_base.ModelType.EPS, 1.0, torch.float32, 0)
    key_map = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    source = {key: value.clone() for key, value in unet.state_dict().items()}
    converted = {comfy_key: source[key] for key, comfy_key in key_map.items() if key in source}
    assert len(converted) == len(source), sorted(set(source) - set(key_map))[:5]
    patcher.model.diffusion_model.load_state_dict(converted, strict=True)
    return patcher


def _comfy_flux_from_diffusers(model):
    """gnri_testing/tiny_models' ComfyUI Flux (mlp_ratio 4, as diffusers' Flux) with the diffusers
    weights, through ComfyUI's own conversion ``comfy.model_detection.convert_diffusers_mmdit``.
    (``comfy.sd.load_diffusion_model_state_dict`` would also detect the config, but its
    Flux detection hard-codes full-size heads and rope axes.)"""
    import comfy.model_detection
    import comfy.supported_models
    from . import tiny_models

    # a copy: the conversion swaps the final adaLN's halves in place (and pops the keys)
    converted = comfy.model_detection.convert_diffusers_mmdit(
        {key: value.clone() for key, value in model.state_dict().items()}, "")
    config = tiny_models._config(comfy.supported_models.FluxSchnell, dict(tiny_models.FLUX_CONFIG, mlp_ratio=4.0),
                                 torch.float32)
    comfy_model = config.get_model({}, device=torch.device("cpu"))
    comfy_model.diffusion_model.load_state_dict(converted, strict=True)
    return tiny_models._patcher(comfy_model.eval())


def comfy_vs_diffusers(kind: str, method: str = "gnri") -> dict:
    """The same tiny weights in ComfyUI (needs ``comfy_env`` set up) and diffusers, the same
    prompt, schedule (the adapter's sigmas, handed to GNRI Invert's code path,
    ``nodes.comfy_glue.invert_latent``) and cfg: max abs difference of one denoiser call
    (cfg 1) and relative difference of the inverted noise."""
    from .pack_loader import pack_module

    glue = pack_module("nodes.comfy_glue")
    if kind == "unet":
        model, make, _, x, prompt, negative = make_case("eps", "euler")
        patcher = _comfy_unet_from_diffusers(model)
        positive, negative_cond = [[prompt[0], {}]], [[negative[0], {}]]
        extra = {}
    else:
        model, make, _, x, prompt, negative = make_case("flux", "flow")
        patcher = _comfy_flux_from_diffusers(model)
        positive = [[prompt[0], {"pooled_output": prompt[1]}]]
        negative_cond = [[negative[0], {"pooled_output": negative[1]}]]
        extra = {"y": prompt[1]}
    ours = gd.invert_latents(model, make(), x, num_inference_steps=STEPS, method=method,
                             **adapter_kwargs(prompt, negative, CFG))
    sigmas = ours.schedule.core_sigmas()
    z, sigma = ours.result.trajectory[0], sigmas[STEPS // 2].view(1)
    with torch.no_grad():
        comfy_denoised = patcher.model.apply_model(z, sigma, c_crossattn=prompt[0], **extra)
        denoised = gd.DiffusersDenoiser(model, ours.schedule, gd.PromptEmbeds(*prompt))(z, sigma)
    raw = patcher.get_model_object("latent_format").process_out(z.clone())  # ComfyUI's raw (VAE) space
    _, inversion = glue.invert_latent(patcher, positive, negative_cond, {"samples": raw}, sigmas, CFG, method)
    theirs = inversion.result
    assert max_diff(theirs.trajectory[0], z) < 1e-5 and theirs.nfe == ours.result.nfe
    return {"denoised": max_diff(comfy_denoised, denoised), "noise": rel_err(theirs.noise, ours.result.noise),
            "nfe": theirs.nfe}
