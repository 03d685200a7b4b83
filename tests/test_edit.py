"""Prompt Swap Edit through ComfyUI's real executor on the tiny models."""
from __future__ import annotations

import pytest
from test_nodes import FAMILIES, invert_node, run_stats, source_nodes


def target_nodes(family: str, prompt_batch: int = 1) -> dict:
    if family == "flow":
        return {"target": {"class_type": "GNRITestConditioning",
                           "inputs": {"family": "flow", "batch": prompt_batch, "seed": 5, "length": 8}}}
    return {"target": {"class_type": "CLIPTextEncode",
                       "inputs": {"clip": ["model", 1], "text": "a photo of a dog on a sofa"}}}


def edit_node(**extra) -> dict:
    inputs = {"model": ["model", 0], "inversion": ["invert", 3], "source": ["positive", 0],
              "target": ["target", 0], "strength": 1.0, "edit_cfg": 1.0, "negative_mode": "source",
              "start_step": 0}
    inputs.update(extra)
    return {"class_type": "GNRIPromptSwapEdit", "inputs": inputs}


def stats_node(a="latent", b="edit") -> dict:
    return {"class_type": "GNRITestLatentStats", "inputs": {"latent_a": [a, 0], "latent_b": [b, 0]}}


def edit_prompt(family, sampler="euler", **edit) -> dict:
    return {**source_nodes(family), **target_nodes(family),
            "invert": invert_node(iterations=8, sampler=sampler, noise_seed=3),
            "edit": edit_node(**edit), "stats": stats_node()}


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_reproduces_input(executor, family):
    stats = run_stats(executor, edit_prompt(family, strength=0.0))
    assert stats["finite"] and stats["rel_rms"] < 1e-3, stats


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_changes_and_strength_orders_change(executor, family):
    changes = [run_stats(executor, edit_prompt(family, strength=s))["rel_rms"] for s in (0.0, 0.5, 1.0, 1.5)]
    assert changes[0] < 1e-3 and changes[1] > 1e-3
    assert changes[1] < changes[2] < changes[3], changes


def test_frozen_noise_maps_are_reused_by_edit(executor):
    stats = run_stats(executor, edit_prompt("eps", sampler="euler_ancestral", strength=0.0))
    assert stats["rel_rms"] < 1e-2, stats


def test_start_step_keeps_source_early(executor):
    full = run_stats(executor, edit_prompt("eps"))["rel_rms"]
    late = run_stats(executor, edit_prompt("eps", start_step=5))["rel_rms"]
    none = run_stats(executor, edit_prompt("eps", start_step=10))["rel_rms"]
    assert none < 1e-3 and 0 < late < full


def mask_nodes(left_half: bool = True) -> dict:
    """A 128x128 MASK: 1 on the left half (SolidMask + a cropped SolidMask composite)."""
    return {"mask_zero": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}},
            "mask_one": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 128}},
            "mask": {"class_type": "MaskComposite",
                     "inputs": {"destination": ["mask_zero", 0], "source": ["mask_one", 0],
                                "x": 0, "y": 0, "operation": "add"}}}


@pytest.mark.parametrize("family,blend_cfg", [("eps", 0.0), ("flow", 0.0), ("eps", 3.0)])
def test_mask_preserves_background_exactly(executor, family, blend_cfg):
    prompt = {**edit_prompt(family, mask=["mask", 0], blend_cfg=blend_cfg), **mask_nodes()}
    executor.run(prompt)
    (edited,) = executor.node_output("edit")
    (latent,) = executor.node_output("latent")
    diff = (edited["samples"] - latent["samples"]).abs()
    width = diff.shape[-1]
    outside = diff[..., width // 2 + 1:]   # right half, away from the bilinear edge
    inside = diff[..., : width // 2 - 1]
    assert float(outside.max()) < 1e-3 * float(latent["samples"].abs().max())
    assert float(inside.mean()) > 10 * float(outside.mean() + 1e-9)


def test_edit_with_batch_of_prompts(executor):
    prompt = {**source_nodes("flow", batch=3, prompt_batch=3), **target_nodes("flow", prompt_batch=3),
              "invert": invert_node(iterations=8), "edit": edit_node(strength=0.0), "stats": stats_node()}
    assert run_stats(executor, prompt)["rel_rms"] < 1e-3


def test_edit_errors(executor):
    from conftest import PromptExecutionError
    # an INVERSION of a flow model given to an eps model
    prompt = edit_prompt("flow", strength=0.0)
    prompt["eps_model"] = {"class_type": "GNRITestTinyModel", "inputs": {"family": "eps", "dtype": "fp32", "seed": 0}}
    prompt["edit"]["inputs"]["model"] = ["eps_model", 0]
    with pytest.raises(PromptExecutionError, match="inversion: made with a flow model"):
        executor.run(prompt)
    # an INVERSION of an EPS model given to a V-prediction model of the same shape
    prompt = edit_prompt("eps", strength=0.0)
    prompt["v_model"] = {"class_type": "GNRITestTinyModel", "inputs": {"family": "v", "dtype": "fp32", "seed": 0}}
    prompt["edit"]["inputs"]["model"] = ["v_model", 0]
    with pytest.raises(PromptExecutionError, match="predicts"):
        executor.run(prompt)
    # a batch of 2 masks for a batch-3 latent
    prompt = {**edit_prompt("eps", mask=["masks", 0]), **mask_nodes(),
              "mask_image": {"class_type": "MaskToImage", "inputs": {"mask": ["mask", 0]}},
              "images": {"class_type": "RepeatImageBatch", "inputs": {"image": ["mask_image", 0], "amount": 2}},
              "masks": {"class_type": "ImageToMask", "inputs": {"image": ["images", 0], "channel": "red"}}}
    prompt["latent"]["inputs"]["batch"] = 3
    with pytest.raises(PromptExecutionError, match="mask: batch of 2 masks"):
        executor.run(prompt)
