"""The methods the benchmark compares and ComfyUI's native inversion.

Every gnri_core method runs with ``tol = 0`` (no early stop), so a budget of k
iterations per step costs exactly k model calls per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class Spec:
    key: str            # short id used in files
    label: str          # shown in tables and plots
    method: str         # gnri_core method, or "native"
    options: dict = field(default_factory=dict)
    iterative: bool = True
    autograd: bool = False


NATIVE = Spec("native", "ComfyUI FlipSigmas+euler", "native", iterative=False)
DDIM = Spec("ddim", "ddim (naive)", "ddim", iterative=False)

SPECS = [
    NATIVE,
    DDIM,
    Spec("fixed_point", "fixed_point", "fixed_point"),
    Spec("anderson", "anderson (AIDI)", "anderson"),
    Spec("renoise", "renoise", "renoise"),
    Spec("newton", "newton (unguided)", "newton"),
    Spec("gnri_paper", "gnri paper, detached", "gnri", {"update": "paper", "gradient": "detached"}),
    Spec("gnri_autograd", "gnri paper, autograd", "gnri", {"update": "paper", "gradient": "autograd"},
         autograd=True),
    Spec("gnri", "gnri secant (default)", "gnri", {"update": "secant"}),
    Spec("gnri_pred", "gnri secant + Euler predictor", "gnri", {"update": "secant", "predictor": "euler"}),
]
BY_KEY = {s.key: s for s in SPECS}


def spec_budgets(spec: Spec, budgets, extra=None) -> list:
    """The budgets a method runs at: ``budgets`` plus ``extra[spec.key]`` (one-call methods: 1)."""
    if not spec.iterative:
        return [1]
    return sorted(set(budgets) | set((extra or {}).get(spec.key, ())))


def relative_to_naive(rows: list) -> list:
    """Adds time and memory ratios to naive inversion (``ddim``) of the same case."""
    base = next(r for r in rows if r["method"] == DDIM.key)
    for r in rows:
        r["time_ratio"] = r["time_s"] / base["time_s"]
        if "mem_bytes" in r and base.get("mem_bytes"):
            r["mem_ratio"] = r["mem_bytes"] / base["mem_bytes"]
    return rows


NO_CHECK = {"round_trip_check": 0.0}  # gnri's solver alone, without the round-trip check
FIXED_BUDGET_CHECKED = {"extra_iters": 0}  # gnri: 3 iterations per step + the round-trip check (the real-time workflows)
FIXED_BUDGET = {**FIXED_BUDGET_CHECKED, **NO_CHECK}  # gnri: exactly its 3 calls per step


def core_options(spec: Spec, budget: int) -> dict:
    if spec.method == "ddim":
        return {}
    # exactly ``budget`` calls per step: no early stop, no extra iterations, no round-trip check
    return dict(spec.options, max_iters=int(budget), tol=0.0, **FIXED_BUDGET)


class _NativeModel:
    """Stands in for ComfyUI's CFGGuider-wrapped model inside ``KSAMPLER.sample``: a
    callable ``(x, sigma, model_options, seed)`` with ``inner_model.model_sampling``."""

    def __init__(self, denoise, model_sampling):
        self.denoise = denoise
        self.inner_model = SimpleNamespace(model_sampling=model_sampling)

    def __call__(self, x, sigma, model_options=None, seed=None):
        return self.denoise(x, sigma)


def native_inversion(denoise, x0: torch.Tensor, sigmas_desc: torch.Tensor, model_sampling) -> torch.Tensor:
    """ComfyUI's native inversion of an analytic denoiser: FlipSigmas (first sigma 0 ->
    1e-4) then ComfyUI's own ``KSAMPLER("euler").sample`` with zero noise, exactly what
    SamplerCustom(add_noise off) runs, including ``noise_scaling`` at the start and
    ``inverse_noise_scaling`` at the end (x / (1 - sigma) on flow models: inf at 1)."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom
    flipped = custom.FlipSigmas.execute(sigmas_desc).args[0]
    sampler = comfy.samplers.sampler_object("euler")
    wrap = _NativeModel(denoise, model_sampling)
    with torch.no_grad():
        return sampler.sample(wrap, flipped, {}, None, torch.zeros_like(x0), latent_image=x0.clone(),
                              disable_pbar=True)
