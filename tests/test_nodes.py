"""GNRI Invert and Guided NR Sampler through ComfyUI's real executor and stock nodes."""
from __future__ import annotations

import pytest
import torch

FAMILIES = ["eps", "v", "flow"]


def source_nodes(family: str, batch: int = 1, dtype: str = "fp32", prompt_batch: int = 1) -> dict:
    """Tiny model, a prompt (real CLIP for UNets, random conditioning for flux), a latent."""
    nodes = {"model": {"class_type": "GNRITestTinyModel",
                       "inputs": {"family": family, "dtype": dtype, "seed": 0}},
             "latent": {"class_type": "GNRITestLatent",
                        "inputs": {"family": "flow" if family == "flow" else "eps", "batch": batch,
                                   "width": 128, "height": 128, "seed": 0}}}
    if family == "flow":
        nodes["positive"] = {"class_type": "GNRITestConditioning",
                             "inputs": {"family": "flow", "batch": prompt_batch, "seed": 0, "length": 8}}
    else:
        nodes["positive"] = {"class_type": "CLIPTextEncode",
                             "inputs": {"clip": ["model", 1], "text": "a photo of a cat on a sofa"}}
    return nodes


def invert_node(method="gnri", iterations=8, steps=10, **extra) -> dict:
    inputs = {"model": ["model", 0], "positive": ["positive", 0], "latent": ["latent", 0],
              "steps": steps, "scheduler": "simple", "cfg": 1.0, "method": method,
              "iterations": iterations, "tolerance": 0.0, "lam": 0.1, "sampler": "euler",
              "newton_form": "secant", "noise_seed": 0}
    inputs.update(extra)
    return {"class_type": "GNRIInvert", "inputs": inputs}


def regenerate_advanced(noise=("invert", 1), sigmas=("invert", 2)) -> dict:
    """SamplerCustomAdvanced + BasicGuider + euler from the NOISE output, compared to the source."""
    return {
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["positive", 0]}},
        "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "regen": {"class_type": "SamplerCustomAdvanced",
                  "inputs": {"noise": list(noise), "guider": ["guider", 0], "sampler": ["euler", 0],
                             "sigmas": list(sigmas), "latent_image": ["latent", 0]}},
        "stats": {"class_type": "GNRITestLatentStats",
                  "inputs": {"latent_a": ["latent", 0], "latent_b": ["regen", 0]}},
    }


def run_stats(executor, prompt: dict, node: str = "stats") -> dict:
    return executor.run(prompt)[node]["gnri_stats"][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_samplercustomadvanced(executor, family):
    """Invert, regenerate with ComfyUI's stock SamplerCustomAdvanced: the input comes back,
    far better than with naive DDIM inversion."""
    errors = {}
    for method, iterations in (("ddim", 1), ("gnri", 8)):
        prompt = {**source_nodes(family), "invert": invert_node(method, iterations), **regenerate_advanced()}
        stats = run_stats(executor, prompt)
        assert stats["finite"]
        errors[method] = stats["rel_rms"]
    assert errors["gnri"] < 1e-3, errors
    assert errors["gnri"] < errors["ddim"] / 100, errors


def ksampler_advanced(start_at_step: int = 0) -> dict:
    """Stock KSamplerAdvanced continuing GNRI Invert's inverted LATENT (add_noise disabled, euler)."""
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["model", 0], "add_noise": "disable", "noise_seed": 0, "steps": 10,
        "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["positive", 0], "negative": ["positive", 0],
        "latent_image": ["invert", 0], "start_at_step": start_at_step, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}


@pytest.mark.parametrize("family", ["eps", "v"])
def test_roundtrip_ksampleradvanced(executor, family):
    """EPS/V: the inverted LATENT into stock KSamplerAdvanced (add_noise disabled, euler)."""
    prompt = {**source_nodes(family), "invert": invert_node(), "regen": ksampler_advanced(),
              "stats": {"class_type": "GNRITestLatentStats",
                        "inputs": {"latent_a": ["latent", 0], "latent_b": ["regen", 0]}}}
    assert run_stats(executor, prompt)["rel_rms"] < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_flipsigmas_samplercustom(executor, family):
    """Only stock nodes around the Guided NR Sampler: FlipSigmas + SamplerCustom inverts,
    SamplerCustom on the unflipped sigmas regenerates (flow models too: no inf)."""
    custom = {"model": ["model", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0,
              "positive": ["positive", 0], "negative": ["positive", 0], "sampler": ["nr", 0]}
    prompt = {**source_nodes(family),
              "sched": {"class_type": "BasicScheduler",
                        "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 10, "denoise": 1.0}},
              "flip": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sched", 0]}},
              "nr": {"class_type": "GuidedNRSampler",
                     "inputs": {"method": "gnri", "iterations": 8, "tolerance": 0.0, "lam": 0.1,
                                "sampler": "euler", "newton_form": "secant"}},
              "inv": {"class_type": "SamplerCustom",
                      "inputs": {**custom, "sigmas": ["flip", 0], "latent_image": ["latent", 0]}},
              "regen": {"class_type": "SamplerCustom",
                        "inputs": {**custom, "sigmas": ["sched", 0], "latent_image": ["inv", 0]}},
              "stats": {"class_type": "GNRITestLatentStats",
                        "inputs": {"latent_a": ["latent", 0], "latent_b": ["regen", 0]}}}
    stats = run_stats(executor, prompt)
    assert stats["finite"] and stats["rel_rms"] < 1e-3, stats


def test_native_flipsigmas_is_inf_on_flow(executor):
    """The pitfall the Guided NR Sampler avoids: ComfyUI's own euler on FlipSigmas."""
    prompt = {**source_nodes("flow"),
              "sched": {"class_type": "BasicScheduler",
                        "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 4, "denoise": 1.0}},
              "flip": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sched", 0]}},
              "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
              "inv": {"class_type": "SamplerCustom", "inputs": {
                  "model": ["model", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0,
                  "positive": ["positive", 0], "negative": ["positive", 0], "sampler": ["euler", 0],
                  "sigmas": ["flip", 0], "latent_image": ["latent", 0]}},
              "stats": {"class_type": "GNRITestLatentStats",
                        "inputs": {"latent_a": ["latent", 0], "latent_b": ["inv", 0]}}}
    assert not run_stats(executor, prompt)["finite"]


def test_invert_outputs_inversion_and_ui_text(executor):
    prompt = {**source_nodes("eps"), "invert": invert_node(steps=4, iterations=2, newton_form="secant_fixed_budget",
                                                           round_trip_check=0.0),
              **regenerate_advanced()}
    ui = executor.run(prompt)
    _, noise, sigmas, inversion = executor.node_output("invert")
    assert inversion.family == "eps" and inversion.result.nfe == 8  # a fixed budget: 2 calls per step
    assert len(inversion.result.trajectory) == 5 and len(inversion.result.residuals) == 4
    assert sigmas[0] > sigmas[-1] and float(sigmas[-1]) == 0.0
    assert inversion.settings["method"] == "gnri"
    text = " ".join(str(t) for t in ui.get("invert", {}).get("text", []))
    assert "8 model calls" in text and "step 4" in text, ui.get("invert")


def test_invert_reports_the_round_trip_that_stock_sampling_reproduces(executor):
    """By default GNRI Invert regenerates once to check its answer: the relative error it
    reports is the one ComfyUI's stock SamplerCustomAdvanced then gets from its noise."""
    prompt = {**source_nodes("eps"), "invert": invert_node(steps=4, iterations=3), **regenerate_advanced()}
    assert "round_trip_check" not in prompt["invert"]["inputs"]  # as in workflows saved before it existed
    ui = executor.run(prompt)
    stats = ui["stats"]["gnri_stats"][0]
    result = executor.node_output("invert")[3].result
    assert result.round_trip_calls in (4, 12) and result.fell_back == [False]
    assert result.round_trip[0] == pytest.approx(stats["rel_rms"], rel=0.05, abs=1e-6)
    text = " ".join(str(t) for t in ui.get("invert", {}).get("text", []))
    assert "round trip (regenerated vs input" in text, text


def test_progress_one_tick_per_step(executor):
    """One tick per inversion step, then one per step of the round-trip check's regeneration
    (the bar's total counts them from the start), and none for the check when it is off;
    with euler_ancestral also naive inversion's two passes, counted from the start."""
    for check, expected in ((0.0, [(i, 5) for i in range(1, 6)]), (None, [(i, 10) for i in range(1, 11)])):
        ticks = []
        invert = invert_node(steps=5, iterations=2)
        if check is not None:
            invert["inputs"]["round_trip_check"] = check
        prompt = {**source_nodes("eps"), "invert": invert, **regenerate_advanced()}
        executor.run(prompt, on_progress=lambda value, total, node: ticks.append((node, value, total)))
        invert_ticks = [(v, t) for node, v, t in ticks if node == "invert"]
        fell_through = executor.node_output("invert")[3].result.round_trip_calls == 15
        assert invert_ticks == (expected + [(i, 20) for i in range(11, 21)] if fell_through else expected)
    ticks = []  # euler_ancestral: always compared with ddim, so the bar knows all four passes from the start
    prompt["invert"] = invert_node(steps=5, iterations=2, sampler="euler_ancestral", noise_seed=7)
    executor.run(prompt, on_progress=lambda value, total, node: ticks.append((node, value, total)))
    assert [(v, t) for node, v, t in ticks if node == "invert"] == [(i, 20) for i in range(1, 21)]


def test_a_converged_inversion_skips_the_check_and_says_so(executor):
    """Through the real executor: where every step converged the check does not regenerate,
    the report says why, and the progress bar ends at its last inversion step, full."""
    ticks, steps = [], 20  # the tiny EPS model converges on every step of a 20-step schedule
    prompt = {**source_nodes("eps"), "invert": invert_node(steps=steps, iterations=3), **regenerate_advanced()}
    ui = executor.run(prompt, on_progress=lambda value, total, node: ticks.append((node, value, total)))
    result = executor.node_output("invert")[3].result
    assert result.round_trip_skipped and result.round_trip_calls == 0 and result.round_trip == []
    assert result.nfe == sum(result.iterations)
    text = " ".join(str(t) for t in ui.get("invert", {}).get("text", []))
    assert "round trip not regenerated" in text, text
    invert_ticks = [(v, t) for node, v, t in ticks if node == "invert"]
    assert invert_ticks[0] == (1, 2 * steps) and invert_ticks[-1] == (steps, steps)
    assert ui["stats"]["gnri_stats"][0]["rel_rms"] < 1e-2


def test_interrupt_between_iterations(executor):
    import nodes as comfy_nodes
    from conftest import PromptExecutionError

    def interrupt(value, total, node):
        if node == "invert":
            comfy_nodes.interrupt_processing()

    prompt = {**source_nodes("eps"), "invert": invert_node(steps=10, iterations=20),
              **regenerate_advanced()}
    with pytest.raises(PromptExecutionError) as info:
        executor.run(prompt, on_progress=interrupt)
    assert info.value.interrupted
    comfy_nodes.interrupt_processing(False)
    assert run_stats(executor, {**source_nodes("eps"), "invert": invert_node(steps=4, iterations=2),
                                **regenerate_advanced()})["finite"]


@pytest.mark.parametrize("family,batch,prompt_batch", [("eps", 3, 1), ("flow", 3, 3)])
def test_batches(executor, family, batch, prompt_batch):
    prompt = {**source_nodes(family, batch=batch, prompt_batch=prompt_batch), "invert": invert_node(),
              **regenerate_advanced()}
    stats = run_stats(executor, prompt)
    assert stats["shape"][0] == batch and stats["rel_rms"] < 1e-3


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_models(executor, dtype):
    prompt = {**source_nodes("eps", dtype=dtype), "invert": invert_node(method="ddim", iterations=1),
              **regenerate_advanced()}
    ddim = run_stats(executor, prompt)["rel_rms"]
    prompt["invert"] = invert_node()
    gnri = run_stats(executor, prompt)
    assert gnri["finite"] and gnri["rel_rms"] < ddim / 10


def test_paper_autograd_through_executor(executor):
    """The gradient through the network works on weights loaded under inference mode."""
    prompt = {**source_nodes("eps"),
              "invert": invert_node(steps=4, iterations=2, newton_form="paper_autograd"),
              **regenerate_advanced()}
    assert run_stats(executor, prompt)["finite"]
    _, _, _, inversion = executor.node_output("invert")
    assert inversion.result.backward_passes == 8


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_frozen_noise_maps_roundtrip_with_stock_euler_ancestral(executor, family):
    """Invert Euler-ancestral with frozen noise maps (seed 1234); ComfyUI's stock
    euler_ancestral with the same noise seed regenerates the input."""
    prompt = {**source_nodes(family),
              "invert": invert_node(iterations=10, sampler="euler_ancestral", noise_seed=1234),
              **regenerate_advanced()}
    prompt["euler"]["inputs"]["sampler_name"] = "euler_ancestral"
    gnri = run_stats(executor, prompt)["rel_rms"]
    prompt["invert"] = invert_node(method="ddim", iterations=1, sampler="euler_ancestral", noise_seed=1234)
    ddim = run_stats(executor, prompt)["rel_rms"]
    assert gnri < 1e-2 and gnri < ddim / 10, (gnri, ddim)


# ---------------------------------------------------------------- bad input

def assert_node_error(executor, prompt, *words):
    from conftest import PromptExecutionError
    with pytest.raises(PromptExecutionError) as info:
        executor.run(prompt)
    message = info.value.exception_message
    for word in words:
        assert word in message, message
    assert "Traceback" not in message


def test_error_latent_channels(executor):
    prompt = {**source_nodes("eps"), "invert": invert_node(steps=2, iterations=1), **regenerate_advanced()}
    prompt["latent"]["inputs"]["family"] = "flow"  # 16 channels into a 4-channel model
    assert_node_error(executor, prompt, "latent", "16 channels", "expects 4")


def test_error_steps_rejected_by_validation(executor):
    from conftest import PromptValidationError
    prompt = {**source_nodes("eps"), "invert": invert_node(steps=0), **regenerate_advanced()}
    with pytest.raises(PromptValidationError) as info:
        executor.run(prompt)
    assert "steps" in str(info.value)


def test_error_unknown_method(executor):
    prompt = {**source_nodes("eps"), "invert": invert_node(method="magic"), **regenerate_advanced()}
    assert_node_error(executor, prompt, "unknown method 'magic'", "gnri")


def test_error_flow_autograd_is_clear(executor):
    prompt = {**source_nodes("flow"),
              "invert": invert_node(steps=2, iterations=2, newton_form="paper_autograd"),
              **regenerate_advanced()}
    assert_node_error(executor, prompt, "autograd", "secant")


def test_errors_from_node_functions(tiny_eps, tiny_clip, comfy):
    """Errors raised before any model call name the input (called directly)."""
    from gnri_testing.pack_loader import pack_module
    glue = pack_module("nodes.comfy_glue")
    Invert = pack_module("nodes.inversion_nodes").GNRIInvert
    InversionInputError = pack_module("gnri_core").InversionInputError

    positive = tiny_clip.encode_from_tokens_scheduled(tiny_clip.tokenize("a cat"))
    good = {"samples": torch.randn(1, 4, 16, 16)}
    args = dict(model=tiny_eps, positive=positive, steps=4, scheduler="simple", cfg=1.0, method="gnri",
                iterations=2, tolerance=0.0, lam=0.1, sampler="euler", newton_form="secant")
    nan = {"samples": good["samples"].clone()}
    nan["samples"][0, 0, 0, 0] = float("nan")
    cases = [
        (dict(latent=nan), "NaN"),
        (dict(latent=good, sigmas=torch.tensor([14.6, 2.0, 5.0, 0.0])), r"strictly descending, got \[14.6, 2.0"),
        (dict(latent=good, sigmas=torch.tensor([])), "sigmas: needs at least 2 values"),
        (dict(latent=good, cfg=float("nan")), "cfg: must be a finite number"),
        (dict(latent=good, lam=float("inf")), "lam: must be a finite number"),
        (dict(latent=good, steps=0), "steps"),
        (dict(latent=good, method="magic"), "unknown method"),
    ]
    for overrides, words in cases:
        with pytest.raises(InversionInputError, match=words):
            Invert.execute(**{**args, **overrides})

    import comfy.model_sampling
    odd = tiny_eps.clone()

    class Unsupported(comfy.model_sampling.IMG_TO_IMG, comfy.model_sampling.ModelSamplingDiscrete):
        pass
    odd.add_object_patch("model_sampling", Unsupported())
    with pytest.raises(InversionInputError, match="model: its sampling type"):
        glue.model_family(odd)


@pytest.mark.server
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_through_http_server(comfy_server, family):
    """The same round trip queued over HTTP on 127.0.0.1: stats come back in /history."""
    prompt = {**source_nodes(family), "invert": invert_node(), **regenerate_advanced()}
    entry = comfy_server.run(prompt, timeout=120)
    stats = entry["outputs"]["stats"]["gnri_stats"][0]
    assert stats["finite"] and stats["rel_rms"] < 1e-3, stats
    assert "model calls" in " ".join(map(str, entry["outputs"]["invert"]["text"]))


def test_newton_form_secant_last_step_is_the_core_option():
    """``secant_last_step`` is the secant update with ``trust_ratio=0`` (step 5's ratio test off)."""
    from gnri_testing import pack_loader
    nodes = pack_loader.pack_module().nodes.inversion_nodes
    options = nodes.solver_options("gnri", 3, 1e-4, 1.0, "euler", "secant_last_step")
    assert options["update"] == "secant" and options["trust_ratio"] == 0.0
    assert "trust_ratio" not in nodes.solver_options("gnri", 3, 1e-4, 1.0, "euler", "secant")


def test_round_trip_check_widget_reaches_the_core_except_for_ddim():
    """The optional ``round_trip_check`` input: absent (older workflows) -> the core default;
    a value -> passed on; ddim stays one call per step; NaN -> a clear error."""
    from gnri_testing import pack_loader
    pack = pack_loader.pack_module()
    nodes = pack.nodes.inversion_nodes
    assert "round_trip_check" not in nodes.solver_options("gnri", 3, 1e-4, 0.3)
    assert nodes.solver_options("gnri", 3, 1e-4, 0.3, round_trip_check=0.0)["round_trip_check"] == 0.0
    assert nodes.solver_options("anderson", 3, 1e-4, 0.3, round_trip_check=0.1)["round_trip_check"] == 0.1
    assert "round_trip_check" not in nodes.solver_options("ddim", 3, 1e-4, 0.3, round_trip_check=0.05)
    with pytest.raises(pack.gnri_core.InversionInputError, match="round_trip_check"):
        nodes.solver_options("gnri", 3, 1e-4, 0.3, round_trip_check=float("nan"))
    schema = nodes.GNRIInvert.define_schema()
    assert schema.inputs[-1].id == "round_trip_check" and schema.inputs[-1].optional
    assert schema.inputs[-1].default == pack.gnri_core.DEFAULTS["gnri"].round_trip_check
