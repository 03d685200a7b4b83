"""The paper's other uses: GNRI Interpolate, GNRI Concept Noise (core and real ComfyUI),
and partial inversion (GNRI Invert's end_at_step)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import PromptExecutionError
from test_nodes import invert_node, ksampler_advanced, regenerate_advanced, run_stats, source_nodes

from gnri_core import InversionInputError, concept_noise, frame_weights, slerp


# --------------------------------------------------------------------------- core

def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def test_slerp_keeps_ends_exact_and_norm():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))[:, None, None, None]  # equal norms
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-5)
    assert abs(cosine(mid, a) - cosine(mid, b)) < 1e-5   # halfway along the great circle
    lerp_norm = torch.lerp(a, b, 0.5).flatten(1).norm(dim=1)
    assert (lerp_norm < 0.8 * a.flatten(1).norm(dim=1)).all()  # what slerp avoids


def test_slerp_parallel_falls_back_to_lerp_and_checks_inputs():
    a = torch.ones(1, 3, 2, 2)
    assert torch.allclose(slerp(a, 2 * a, 0.25), 1.25 * a)
    with pytest.raises(InversionInputError, match="t must lie"):
        slerp(a, a, 1.5)
    with pytest.raises(InversionInputError, match="shapes"):
        slerp(a, torch.ones(1, 3, 2, 3), 0.5)
    assert frame_weights(3) == [0.0, 0.5, 1.0]
    with pytest.raises(InversionInputError, match="frames"):
        frame_weights(1)


@pytest.mark.parametrize("spread", [0.0, 0.3, 0.5, 1.0])
def test_concept_noise_spread_is_the_angle_to_the_centroid(spread):
    examples = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    draws = concept_noise(examples, 5, spread, torch.Generator().manual_seed(2))
    assert draws.shape == (5, 4, 8, 8)
    centre = examples.mean(0, keepdim=True).expand_as(draws)
    cos = torch.nn.functional.cosine_similarity(draws.flatten(1).double(), centre.flatten(1).double())
    assert torch.allclose(cos, torch.full_like(cos, math.cos(spread * math.pi / 2)), atol=1e-5)
    norms = draws.flatten(1).norm(dim=1)
    assert torch.allclose(norms, examples.flatten(1).norm(dim=1).mean().expand_as(norms), rtol=1e-5)
    again = concept_noise(examples, 5, spread, torch.Generator().manual_seed(2))
    assert torch.equal(draws, again)


def test_concept_noise_of_one_example_at_spread_zero_is_that_example():
    example = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(concept_noise(example, 2, 0.0), example.expand(2, -1, -1, -1), atol=1e-5)
    with pytest.raises(InversionInputError, match="spread"):
        concept_noise(example, 2, -0.1)


# --------------------------------------------------------------------------- nodes (executor)

CHEAP = {"method": "ddim", "iterations": 1, "steps": 4}  # the ends must match the inversions, not the inputs


def pair_nodes(family: str, seed_b: int = 1, width_b: int = 128, **invert_b) -> dict:
    """Two latents and prompts, each inverted with 4 ddim steps (ids invert / invert_b)."""
    nodes = source_nodes(family)
    nodes["latent_b"] = {"class_type": "GNRITestLatent",
                         "inputs": {"family": "flow" if family == "flow" else "eps", "batch": 1,
                                    "width": width_b, "height": 128, "seed": seed_b}}
    if family == "flow":
        nodes["positive_b"] = {"class_type": "GNRITestConditioning",
                               "inputs": {"family": "flow", "batch": 1, "seed": 9, "length": 8}}
    else:
        nodes["positive_b"] = {"class_type": "CLIPTextEncode",
                               "inputs": {"clip": ["model", 1], "text": "a photo of a dog in the snow"}}
    nodes["invert"] = invert_node(**CHEAP)
    nodes["invert_b"] = invert_node(**{**CHEAP, **invert_b})
    nodes["invert_b"]["inputs"].update(positive=["positive_b", 0], latent=["latent_b", 0])
    return nodes


def interpolate_node(frames: int = 4) -> dict:
    return {"class_type": "GNRIInterpolate",
            "inputs": {"model": ["model", 0], "inversion_a": ["invert", 3], "inversion_b": ["invert_b", 3],
                       "positive_a": ["positive", 0], "positive_b": ["positive_b", 0], "frames": frames}}


def frames_stats() -> dict:
    """An output node that makes the executor run the interpolation."""
    return {"class_type": "GNRITestLatentStats", "inputs": {"latent_a": ["interp", 0], "latent_b": ["interp", 0]}}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).double().norm() / ref.double().norm())


def regenerated(executor, prompt: dict, inversion: str, positive: str) -> torch.Tensor:
    """What SamplerCustomAdvanced regenerates from ``inversion``'s NOISE with ``positive``."""
    nodes = regenerate_advanced(noise=(inversion, 1), sigmas=(inversion, 2))
    nodes["guider"]["inputs"]["conditioning"] = [positive, 0]
    nodes["stats"]["inputs"].update(latent_a=["regen", 0], latent_b=["regen", 0])
    executor.run({**prompt, **nodes})
    return executor.node_output("regen")[0]["samples"]


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_interpolate_ends_are_the_reconstructions(executor, family):
    prompt = pair_nodes(family)
    executor.run({**prompt, "interp": interpolate_node(4), "stats": frames_stats()})
    x = executor.node_output("interp")[0]["samples"]
    a, b = regenerated(executor, prompt, "invert", "positive"), regenerated(executor, prompt, "invert_b", "positive_b")
    assert x.shape == (4, *a.shape[1:]) and torch.isfinite(x).all()
    assert rel(x[:1], a) < 1e-5 and rel(x[3:], b) < 1e-5
    distances = [rel(x[i:i + 1], a) for i in range(4)]
    assert distances == sorted(distances), distances  # moves away from a, frame by frame


def test_interpolate_with_shared_frozen_noise_maps(executor):
    ancestral = {"sampler": "euler_ancestral", "noise_seed": 3}
    prompt = pair_nodes("eps", **ancestral)
    prompt["invert"]["inputs"].update(ancestral)
    executor.run({**prompt, "interp": interpolate_node(2), "stats": frames_stats()})
    x = executor.node_output("interp")[0]["samples"]
    edit = {"class_type": "GNRIPromptSwapEdit", "inputs": {
        "model": ["model", 0], "inversion": ["invert_b", 3], "source": ["positive_b", 0],
        "target": ["positive_b", 0], "strength": 0.0, "edit_cfg": 1.0, "negative_mode": "empty", "start_step": 0}}
    executor.run({**prompt, "edit": edit, "stats": {"class_type": "GNRITestLatentStats",
                                                    "inputs": {"latent_a": ["edit", 0], "latent_b": ["edit", 0]}}})
    assert rel(x[1:], executor.node_output("edit")[0]["samples"]) < 1e-5


@pytest.mark.parametrize("invert_b,message", [
    ({"steps": 8}, "inversion_b: its schedule"),
    ({"sampler": "euler_ancestral", "noise_seed": 5}, "frozen noise maps"),
    ({"cfg": 2.0}, "inversion_b: its cfg"),
])
def test_interpolate_refuses_mismatched_inversions(executor, invert_b, message):
    prompt = {**pair_nodes("eps", **invert_b), "interp": interpolate_node(), "stats": frames_stats()}
    with pytest.raises(PromptExecutionError, match=message) as info:
        executor.run(prompt)
    assert info.value.node_id == "interp"


def test_interpolate_refuses_other_latent_size(executor):
    prompt = {**pair_nodes("eps", width_b=96), "interp": interpolate_node(), "stats": frames_stats()}
    with pytest.raises(PromptExecutionError, match="latent shape"):
        executor.run(prompt)


def concept_nodes(spread: float, batch_size: int, seed: int = 0) -> dict:
    nodes = {"concept": {"class_type": "GNRIConceptNoise",
                         "inputs": {"model": ["model", 0], "inversion": ["invert", 3], "spread": spread,
                                    "noise_seed": seed, "batch_size": batch_size}}}
    nodes.update(regenerate_advanced(noise=("concept", 0)))
    nodes["regen"]["inputs"]["latent_image"] = ["concept", 1]
    nodes["stats"]["inputs"]["latent_b"] = ["regen", 0]
    return nodes


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_concept_noise_of_one_example_at_spread_zero_is_its_reconstruction(executor, family):
    prompt = {**source_nodes(family), "invert": invert_node(**CHEAP)}
    executor.run({**prompt, **concept_nodes(0.0, 1)})
    assert rel(executor.node_output("regen")[0]["samples"], regenerated(executor, prompt, "invert", "positive")) < 1e-5


def test_concept_noise_draws_a_seeded_batch(executor):
    def draw(seed):
        prompt = {**source_nodes("eps", batch=2), "invert": invert_node(**CHEAP), **concept_nodes(0.5, 3, seed)}
        prompt["stats"]["inputs"]["latent_a"] = ["regen", 0]  # 3 draws from 2 examples
        executor.run(prompt)
        return executor.node_output("regen")[0]["samples"]
    x = draw(0)
    assert x.shape[0] == 3 and torch.isfinite(x).all()
    assert rel(x[0], x[1]) > 1e-2 and rel(x[1], x[2]) > 1e-2
    assert torch.equal(x, draw(0)) and not torch.equal(x, draw(1))


# --------------------------------------------------------------------------- partial inversion

def split_sigmas(step: int) -> dict:
    return {"schedule": {"class_type": "BasicScheduler",
                         "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 10, "denoise": 1.0}},
            "split": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["schedule", 0], "step": step}}}


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_end_at_step_equals_split_sigmas(executor, family):
    def inverted(prompt):
        prompt["stats"] = {"class_type": "GNRITestLatentStats",
                           "inputs": {"latent_a": ["invert", 0], "latent_b": ["invert", 0]}}
        executor.run(prompt)
        return executor.node_output("invert")
    cut = inverted({**source_nodes(family), "invert": invert_node("ddim", 1, end_at_step=4)})
    wired = inverted({**source_nodes(family), **split_sigmas(4), "invert": invert_node("ddim", 1, sigmas=["split", 1])})
    assert torch.equal(cut[0]["samples"], wired[0]["samples"])
    assert torch.equal(cut[2], wired[2]) and len(cut[2]) == 7  # sigmas from generation step 4 down to 0


def test_end_at_step_hands_over_to_samplers_and_prompt_swap_edit(executor):
    prompt = {**source_nodes("eps"), "invert": invert_node(end_at_step=4),
              "ksampler": ksampler_advanced(start_at_step=4),
              "edit": {"class_type": "GNRIPromptSwapEdit", "inputs": {
                  "model": ["model", 0], "inversion": ["invert", 3], "source": ["positive", 0],
                  "target": ["positive", 0], "strength": 0.0, "edit_cfg": 1.0, "negative_mode": "source",
                  "start_step": 0}},
              **{k: v for k, v in regenerate_advanced().items() if k != "stats"},
              "stats": {"class_type": "GNRITestLatentStats",
                        "inputs": {"latent_a": ["latent", 0], "latent_b": ["regen", 0]}},
              "stats_ksampler": {"class_type": "GNRITestLatentStats",
                                 "inputs": {"latent_a": ["latent", 0], "latent_b": ["ksampler", 0]}},
              "stats_edit": {"class_type": "GNRITestLatentStats",
                             "inputs": {"latent_a": ["latent", 0], "latent_b": ["edit", 0]}}}
    ui = executor.run(prompt)
    assert ui["stats"]["gnri_stats"][0]["rel_rms"] < 1e-3         # NOISE + sigmas outputs
    assert ui["stats_ksampler"]["gnri_stats"][0]["rel_rms"] < 1e-3  # inverted_latent, start_at_step 4
    assert ui["stats_edit"]["gnri_stats"][0]["rel_rms"] < 1e-3


def test_end_at_step_past_the_schedule_is_refused(executor):
    prompt = {**source_nodes("eps"), "invert": invert_node(end_at_step=10), **regenerate_advanced()}
    with pytest.raises(PromptExecutionError, match=r"end_at_step: must lie in \[0, 9\]"):
        executor.run(prompt)


# --------------------------------------------------------------------------- real server

def stats(a, b) -> dict:
    return {"class_type": "GNRITestLatentStats", "inputs": {"latent_a": list(a), "latent_b": list(b)}}


@pytest.mark.server
def test_interpolate_and_concept_noise_through_server(comfy_server):
    """Over HTTP: the last frame is inversion b's reconstruction, a single example's concept
    noise at spread 0 is that example's."""
    prompt = {**pair_nodes("eps"), "interp": interpolate_node(3), **concept_nodes(0.0, 1),
              "last": {"class_type": "LatentFromBatch", "inputs": {"samples": ["interp", 0], "batch_index": 2,
                                                                    "length": 1}},
              "guider_b": {"class_type": "BasicGuider",
                           "inputs": {"model": ["model", 0], "conditioning": ["positive_b", 0]}},
              "regen_a": {"class_type": "SamplerCustomAdvanced", "inputs": {
                  "noise": ["invert", 1], "guider": ["guider", 0], "sampler": ["euler", 0],
                  "sigmas": ["invert", 2], "latent_image": ["latent", 0]}}}
    prompt["regen_b"] = {"class_type": "SamplerCustomAdvanced", "inputs": dict(
        prompt["regen_a"]["inputs"], noise=["invert_b", 1], guider=["guider_b", 0], sigmas=["invert_b", 2])}
    prompt.update(stats=stats(("regen_a", 0), ("regen", 0)), stats_last=stats(("regen_b", 0), ("last", 0)))
    entry = comfy_server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["stats"]["gnri_stats"][0]["rel_rms"] < 1e-5
    assert entry["outputs"]["stats_last"]["gnri_stats"][0]["rel_rms"] < 1e-5
