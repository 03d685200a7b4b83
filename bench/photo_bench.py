"""The exact photo model (``photo_model.PhotoMixture``): every method at every budget.

Inputs per case (family x steps):
  * ``gen<seed>``: images the model generated with ComfyUI's ``euler`` (the core's
    ``reconstruct``) from known noise: the exact inverse is that noise;
  * held-out real photos (not in the mixture): only the reconstruction is measurable.

Reconstruction: deterministic Euler from the inverted noise down the same schedule
(what SamplerCustomAdvanced + euler does with the ``noise`` output), PSNR/SSIM in
pixels ([-1, 1], clipped as displayed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import metrics
from .methods import DDIM, NATIVE, Spec, core_options, native_inversion, relative_to_naive, spec_budgets
from .photo_model import PhotoMixture, heldout_photo


@dataclass
class PhotoCase:
    family: str
    steps: int
    inputs: tuple  # ("gen0", "gen1", "chelsea", ...)


def schedules(family: str, steps: int, model_sampling) -> torch.Tensor:
    """Descending ComfyUI ``simple`` schedule (BasicScheduler) for the family's sampling."""
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model_sampling[family], "simple", steps).float().cpu()


def model_samplings():
    """ComfyUI's sampling objects: SD1.5's discrete EPS schedule, Flux-schnell's flow one."""
    import comfy.model_base
    import comfy.supported_models

    def make(config_cls, model_type):
        return comfy.model_base.model_sampling(config_cls({"dtype": torch.float32}), model_type)

    return {"eps": make(comfy.supported_models.SD15, comfy.model_base.ModelType.EPS),
            "flow": make(comfy.supported_models.FluxSchnell, comfy.model_base.ModelType.FLUX)}


def prepare_input(model: PhotoMixture, name: str, sigmas_desc: torch.Tensor, core):
    """(x0, exact noise or None)."""
    if name.startswith("gen"):
        noise = model.initial_noise(float(sigmas_desc[0]), 1, seed=int(name[3:]) + 1)
        x0 = core.reconstruct(model, noise, sigmas_desc)
        return x0, noise
    return heldout_photo(name, model.size), None


def run_one(core, model: PhotoMixture, spec: Spec, budget: int, x0, noise_ref, sigmas_desc,
            sampling, measure_memory: bool, repeat: int) -> dict:
    family = model.family
    sigma_max = float(sigmas_desc[0])
    calls0 = model.calls
    if spec.method == "native":
        fn = lambda: native_inversion(model, x0, sigmas_desc, sampling)
        noise, seconds = metrics.timed(fn, repeat)
        nfe, backward, histories = (model.calls - calls0) // repeat, 0, []
    else:
        opts = core_options(spec, budget)
        fn = lambda: core.invert(model, x0, sigmas_desc.flip(0), method=spec.method,
                                 family=family, **opts)
        result, seconds = metrics.timed(fn, repeat)
        noise, nfe, backward, histories = result.noise, result.nfe, result.backward_passes, result.histories
    record = {"model": "photo", "family": family, "steps": len(sigmas_desc) - 1, "method": spec.key,
              "label": spec.label, "budget": budget, "nfe": nfe, "backward": backward,
              "time_s": seconds, "histories": [list(h) for h in histories]}
    if metrics.finite(noise):
        with torch.no_grad():
            rec = core.reconstruct(model, noise, sigmas_desc)
    else:
        rec = noise
    record["psnr"] = metrics.psnr(rec, x0, 2.0, clamp=(-1, 1))
    record["ssim"] = metrics.ssim(rec, x0, 2.0, clamp=(-1, 1))
    record["rec_err"] = metrics.relative_error(rec, x0)
    record["noise_err"] = metrics.relative_error(noise, noise_ref) if noise_ref is not None else None
    eps = noise / sigma_max if family == "eps" else noise  # flow: sigma_max = 1, z = eps
    record.update({f"noise_{k}": v for k, v in metrics.noise_stats(eps).items()})
    if measure_memory:
        record["mem_bytes"] = metrics.peak_memory(fn)
    return record


def run(core, cases, specs, budgets, sampling, progress, size=32, repeat=1, memory_input=0):
    """Yields one record per (case, input, method, budget)."""
    for case in cases:
        model = PhotoMixture(case.family, size=size)
        sigmas = schedules(case.family, case.steps, sampling)
        for index, name in enumerate(case.inputs):
            x0, noise_ref = prepare_input(model, name, sigmas, core)
            truth = None
            if noise_ref is not None:  # the exact noise's own statistics, for reference
                eps = noise_ref / float(sigmas[0]) if case.family == "eps" else noise_ref
                truth = metrics.noise_stats(eps)
            rows = []
            for spec in specs:
                for budget in spec_budgets(spec, budgets):
                    progress.set_postfix_str(f"photo {case.family} {case.steps} {name} {spec.key} {budget}")
                    mem = index == memory_input and budget in (1, 2)
                    record = run_one(core, model, spec, budget, x0, noise_ref, sigmas,
                                     sampling[case.family], mem, repeat)
                    record["input"] = name
                    record["true_noise_stats"] = truth
                    rows.append(record)
                    progress.update(1)
            yield from relative_to_naive(rows)


def count(cases, specs, budgets) -> int:
    per_input = sum(len(spec_budgets(s, budgets)) for s in specs)
    return sum(len(c.inputs) * per_input for c in cases)


__all__ = ["DDIM", "NATIVE", "PhotoCase", "count", "model_samplings", "run", "schedules"]
