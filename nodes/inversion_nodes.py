"""GNRI Invert and Guided NR Sampler: thin V3 nodes over ``comfy_glue`` and ``gnri_core``."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ..gnri_core import DEFAULTS, METHODS, InversionInputError
from ..gnri_core.result import SKIP_CHECK_RESIDUAL
from .comfy_glue import (InvertedNoise, batch_notes, check_finite, empty_latent_note, guided_nr_sampler,
                         invert_latent, notes_text, schedule)

INVERSION = io.Custom("GNRI_INVERSION")
CATEGORY = "sampling/inversion"

METHOD_TOOLTIP = ("gnri: guided Newton-Raphson (default, most exact for its cost); ddim: naive, 1 model "
                  "call per step; fixed_point, anderson (AIDI), renoise, newton (unguided): baselines")


SAMPLERS = {"euler": {}, "euler_ancestral": {"ancestral": True}}

NEWTON_FORMS = {
    "secant": {"update": "secant"},
    "secant_last_step": {"update": "secant", "trust_ratio": 0.0},
    "secant_fixed_budget": {"update": "secant", "extra_iters": 0},
    "paper_detached": {"update": "paper", "gradient": "detached"},
    "paper_autograd": {"update": "paper", "gradient": "autograd"},
}


def method_input():
    return io.Combo.Input("method", options=list(METHODS), default="gnri", tooltip=METHOD_TOOLTIP)


def solver_inputs():
    """Widgets shared by both nodes (named once)."""
    gnri = DEFAULTS["gnri"]
    return [
        io.Int.Input("iterations", default=gnri.max_iters, min=1, max=100,
                     tooltip=("Model calls per inversion step (ddim always uses 1). gnri: a step still "
                              f"unconverged after them (relative residual above {gnri.extra_tol:g}) continues, "
                              f"up to {gnri.extra_iters} more; newton_form secant_fixed_budget: at most these (a step within tolerance stops).")),
        io.Float.Input("tolerance", default=gnri.tol, min=0.0, max=1.0, step=1e-5, round=False,
                       tooltip=("Stop a step early once its relative residual is below this (0: never); gnri then "
                                "takes one more Newton step from there, at no model call.")),
        io.Float.Input("lam", default=gnri.lam, min=0.0, max=100.0, step=0.01, round=False,
                       display_name="λ (guidance)",
                       tooltip=("GNRI guidance weight: pulls what the model barely determines toward naive "
                                "inversion's answer (0: unguided). Larger: fewer images that come back worse "
                                "than naive inversion, less exact ones; ancestral steps are pulled harder.")),
        io.Combo.Input("sampler", options=list(SAMPLERS), default="euler",
                       tooltip=("The sampler that regenerates: euler (deterministic, = DDIM) or euler_ancestral "
                                "with frozen noise maps (ComfyUI's euler_ancestral with the same noise seed "
                                "regenerates exactly).")),
        io.Combo.Input("newton_form", options=list(NEWTON_FORMS), default="secant",
                       tooltip=("gnri/newton update: secant Jacobian (default); secant_last_step: the same, "
                                "always returning its last Newton step (more exact on smooth models, more "
                                "mode flips on sharply multi-modal ones); secant_fixed_budget: the same with "
                                "no extra iterations for unconverged steps (faster, less exact); the paper's scalar update with the "
                                "reference code's detached gradient; or with the gradient through the network "
                                "(one backward pass per iteration).")),
    ]


def round_trip_input():
    """Optional, last: saved workflows without it keep their widget order and get the default."""
    return io.Float.Input("round_trip_check", default=DEFAULTS["gnri"].round_trip_check, min=0.0, max=10.0,
                          step=0.01, round=False, optional=True,
                          tooltip=("After inverting, regenerate once (one model call per step) and report how "
                                   "closely that reproduces the input. Where an image's relative error exceeds "
                                   "this (with euler_ancestral: always), also invert it naively (ddim, two calls per step) "
                                   "and keep whichever reproduces it better: an image that misses this is never worse "
                                   "than naive inversion. Skipped (no calls) where every step of every image converged "
                                   f"(relative residual within {SKIP_CHECK_RESIDUAL:g}). 0: off (exactly the solver's calls). "
                                   "Not with method ddim."))


def choice(table: dict, value: str, name: str) -> dict:
    if value not in table:
        raise InversionInputError(f"{name}: unknown {value!r}; expected one of {list(table)}")
    return table[value]


def solver_options(method: str, iterations: int, tolerance: float, lam: float,
                   sampler: str = "euler", newton_form: str = "secant", round_trip_check=None) -> dict:
    check_finite(tolerance=tolerance, lam=lam, round_trip_check=round_trip_check)
    options = dict(choice(SAMPLERS, sampler, "sampler"))
    if method != "ddim":  # ddim: 1 call per step, nothing to check it against
        options.update(max_iters=iterations, tol=tolerance, lam=lam)
        if round_trip_check is not None:
            options.update(round_trip_check=round_trip_check)
    if method in ("gnri", "newton"):
        options.update(choice(NEWTON_FORMS, newton_form, "newton_form"))
    return options


def partial(ascending, end_at_step: int):
    """The ascending schedule cut where generation step ``end_at_step`` starts."""
    steps = len(ascending) - 1
    if end_at_step == 0:
        return ascending
    if not 0 < end_at_step < steps:
        raise InversionInputError(f"end_at_step: must lie in [0, {steps - 1}] for a {steps}-step schedule, "
                                  f"got {end_at_step}")
    return ascending[:len(ascending) - end_at_step]


class GNRIInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GNRIInvert",
            display_name="GNRI Invert",
            category=CATEGORY,
            description="Finds the noise from which the deterministic sampler regenerates this latent.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="A prompt describing the image."),
                io.Latent.Input("latent", tooltip="The VAE-encoded image to invert."),
                io.Int.Input("steps", default=4, min=1, max=10000),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
                method_input(),
                *solver_inputs(),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the frozen noise maps (sampler euler_ancestral only)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Used when cfg != 1; default: the positive zeroed out."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Overrides steps/scheduler (either direction)."),
                io.Int.Input("end_at_step", default=0, min=0, max=10000, optional=True,
                             tooltip=("Partial inversion (Unsampler's end_at_step): stop at the noise level where "
                                      "generation step N starts; 0 inverts fully. Regenerate with the sigmas "
                                      "output, or KSamplerAdvanced start_at_step N. Same as SplitSigmas(N)'s "
                                      "low sigmas into `sigmas`.")),
                round_trip_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="inverted_latent"),
                io.Noise.Output(display_name="noise"),
                io.Sigmas.Output(display_name="sigmas"),
                INVERSION.Output(display_name="inversion"),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, cfg, method, iterations,
                tolerance, lam, sampler, newton_form, noise_seed=0, negative=None,
                sigmas=None, end_at_step=0, round_trip_check=None) -> io.NodeOutput:
        check_finite(cfg=cfg)
        ascending = partial(schedule(model, steps, scheduler, sigmas), end_at_step)
        options = solver_options(method, iterations, tolerance, lam, sampler, newton_form, round_trip_check)
        inverted, inversion = invert_latent(model, positive, negative, latent, ascending, cfg, method,
                                            seed=noise_seed, **options)
        noise = InvertedNoise(inversion.result.noise, float(ascending[-1]),
                              model.get_model_object("model_sampling"), inversion.latent_format,
                              seed=noise_seed)
        samples = latent["samples"]
        notes = empty_latent_note(samples) + batch_notes(samples.shape[0], positive=positive, negative=negative)
        return io.NodeOutput(inverted, noise, ascending.flip(0), inversion,
                             ui=ui.PreviewText(notes_text(notes, inversion.result.summary())))


class GuidedNRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidedNRSampler",
            display_name="Guided NR Sampler",
            category=CATEGORY,
            description=("SAMPLER for SamplerCustom(Advanced): inverts on ascending sigmas (FlipSigmas), "
                         "samples with the matching deterministic Euler/DDIM step on descending sigmas."),
            inputs=[method_input(), *solver_inputs(), round_trip_input()],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, method, iterations, tolerance, lam, sampler, newton_form,
                round_trip_check=None) -> io.NodeOutput:
        options = solver_options(method, iterations, tolerance, lam, sampler, newton_form, round_trip_check)
        return io.NodeOutput(guided_nr_sampler(method, **options))
