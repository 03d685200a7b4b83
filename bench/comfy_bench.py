"""The tiny ComfyUI test models (EPS, V-prediction, flow; random weights, 16x16 latents)
run through ComfyUI's own sampling: the pack's inversion (``comfy_glue.invert_latent``,
what GNRI Invert runs) against ComfyUI's native BasicScheduler -> FlipSigmas ->
SamplerCustom(euler), both regenerated with ComfyUI's stock sampling.

Measures the real per-call overheads: wall time of the whole inversion, time inside
the network (a ``model_function_wrapper`` around ``apply_model``), hence the time
spent outside model calls (ComfyUI's conditioning/CFG plumbing plus the solver).
Metrics are on the raw latents (PSNR with the reference latent's range as peak).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import metrics
from .methods import Spec, core_options, relative_to_naive, spec_budgets

PROMPT = "a photo of a cat on a sofa"


@dataclass
class TinyCase:
    family: str   # eps, v, flow
    steps: int
    inputs: tuple  # "gen" (generated from known noise), "random" (a random latent)


class ModelClock:
    """Times every network call of a ModelPatcher (ComfyUI's model_function_wrapper)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, apply_model, args):
        t0 = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def family_setup(family):
    from gnri_testing import tiny_models
    model = tiny_models.tiny_model(family).clone()
    clock = ModelClock()
    model.set_model_unet_function_wrapper(clock)
    if family == "flow":
        positive = tiny_models.flux_conditioning(1, seed=0)
    else:
        clip = tiny_models.tiny_clip()
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    return model, clock, positive


def regenerate(model, positive, noise, latent_samples, sigmas_desc):
    """Stock ComfyUI: CFGGuider(cfg 1) + euler from a NOISE object (SamplerCustomAdvanced)."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    latent = {"samples": latent_samples}
    return guider.sample(noise.generate_noise(latent), latent_samples,
                         comfy.samplers.sampler_object("euler"), sigmas_desc, seed=0, disable_pbar=True)


def prepare_input(pack, model, positive, family, name, sigmas_desc):
    """(raw latent x0, exact model-space noise or None)."""
    from gnri_testing import tiny_models
    shape_family = "flow" if family == "flow" else "eps"
    if name == "random":
        return tiny_models.random_latent(shape_family, 1, 16, 16, seed=0), None
    channels = tiny_models.LATENT_CHANNELS[family]
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(1, channels, 16, 16, generator=gen)
    sigma_max = float(sigmas_desc[0])
    z_top = eps * (sigma_max if family != "flow" else 1.0)
    glue = pack.nodes.comfy_glue
    noise = glue.InvertedNoise(z_top, sigma_max, model.get_model_object("model_sampling"),
                               model.get_model_object("latent_format"))
    with torch.no_grad():
        x0 = regenerate(model, positive, noise, torch.zeros(1, channels, 16, 16), sigmas_desc)
    return x0, z_top


def native(model, positive, latent_samples, sigmas_desc):
    """ComfyUI's own inversion and regeneration (BasicScheduler -> FlipSigmas -> SamplerCustom
    euler, add_noise off; back with SamplerCustom euler on the unflipped sigmas)."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom
    flipped = custom.FlipSigmas.execute(sigmas_desc.clone()).args[0]
    euler = comfy.samplers.sampler_object("euler")

    def invert():
        return custom.SamplerCustom.execute(model, False, 0, 1.0, positive, positive, euler, flipped,
                                            {"samples": latent_samples}).args[0]
    return invert, lambda inverted: custom.SamplerCustom.execute(
        model, False, 0, 1.0, positive, positive, euler, sigmas_desc, inverted).args[0]["samples"]


def run_one(pack, model, clock, positive, family, spec: Spec, budget, x0, noise_ref, sigmas_desc,
            measure_memory, repeat):
    glue = pack.nodes.comfy_glue
    sigma_max = float(sigmas_desc[0])
    record = {"model": "tiny", "family": family, "steps": len(sigmas_desc) - 1, "method": spec.key,
              "label": spec.label, "budget": budget, "backward": 0, "histories": []}
    if spec.method == "native":
        invert, back = native(model, positive, x0, sigmas_desc)
        fn = invert
    else:
        opts = core_options(spec, budget)
        ascending = sigmas_desc.flip(0)

        def fn():
            return glue.invert_latent(model, positive, None, {"samples": x0}, ascending, 1.0,
                                      spec.method, **opts)
    best = None
    for _ in range(repeat):
        clock.reset()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        if best is None or seconds < best[0]:
            best = (seconds, clock.seconds, clock.calls, out)
    seconds, model_seconds, calls, out = best
    record.update(time_s=seconds, model_time_s=model_seconds, nfe=calls,
                  outside_ms_per_call=1000 * (seconds - model_seconds) / max(calls, 1))
    if spec.method == "native":
        inverted = out
        noise = inverted["samples"]  # raw latent space (ComfyUI returns process_latent_out)
        with torch.no_grad():
            rec = back(inverted) if metrics.finite(noise) else noise
        z_top = model.get_model_object("latent_format").process_in(noise) if metrics.finite(noise) else noise
    else:
        _, inversion = out
        result = inversion.result
        record["backward"] = result.backward_passes
        record["histories"] = [list(h) for h in result.histories]
        z_top = result.noise
        noise_obj = glue.InvertedNoise(z_top, sigma_max, model.get_model_object("model_sampling"),
                                       inversion.latent_format)
        with torch.no_grad():
            rec = regenerate(model, positive, noise_obj, x0, sigmas_desc)
    span = float(x0.max() - x0.min())
    record["psnr"] = metrics.psnr(rec, x0, span)
    record["ssim"] = metrics.ssim(rec, x0, span)
    record["rec_err"] = metrics.relative_error(rec, x0)
    record["noise_err"] = metrics.relative_error(z_top, noise_ref) if noise_ref is not None else None
    eps = z_top / sigma_max if family != "flow" else z_top
    record.update({f"noise_{k}": v for k, v in metrics.noise_stats(eps).items()})
    if measure_memory:
        record["mem_bytes"] = metrics.peak_memory(fn)
    return record


def run(pack, cases, specs, budgets, progress, repeat=1, extra=None):
    import comfy.samplers
    setups = {}
    for case in cases:
        if case.family not in setups:
            setups[case.family] = family_setup(case.family)
        model, clock, positive = setups[case.family]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple",
                                                 case.steps).float().cpu()
        for index, name in enumerate(case.inputs):
            x0, noise_ref = prepare_input(pack, model, positive, case.family, name, sigmas)
            rows = []
            for spec in specs:
                if spec.autograd and case.family == "flow":
                    continue  # ComfyUI's Flux uses in-place ops: no gradient through it
                for budget in spec_budgets(spec, budgets, extra):
                    progress.set_postfix_str(f"tiny {case.family} {case.steps} {name} {spec.key} {budget}")
                    record = run_one(pack, model, clock, positive, case.family, spec, budget, x0,
                                     noise_ref, sigmas, index == 0 and budget in (1, 2), repeat)
                    record["input"] = name
                    rows.append(record)
                    progress.update(1)
            yield from relative_to_naive(rows)


def count(cases, specs, budgets, extra=None) -> int:
    total = 0
    for c in cases:
        for s in specs:
            if s.autograd and c.family == "flow":
                continue
            total += len(c.inputs) * len(spec_budgets(s, budgets, extra))
    return total
