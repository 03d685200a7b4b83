"""The example workflows: their node types exist in the real server, their
API-format equivalents run there on the tiny test models, and the edit workflows edit
on the trained world models (gnri_world)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from gnri_testing import comfy_env

sys.path.insert(0, os.path.join(comfy_env.REPO_ROOT, "scripts"))
import workflows  # noqa: E402

FILES = sorted(f for f in os.listdir(workflows.WORKFLOW_DIR) if f.endswith(".json"))


def load(name: str) -> dict:
    with open(os.path.join(workflows.WORKFLOW_DIR, name)) as f:
        return json.load(f)


def tiny_prompt(workflow: dict, node_classes: dict) -> dict:
    """The workflow's API prompt with loaders, VAE and image files replaced by tiny stand-ins."""
    family = workflow["extra"]["gnri_test_family"]
    prompt, redirect = {}, {}
    for node_id, entry in workflow_api(workflow, node_classes).items():
        kind, inputs = entry["class_type"], entry["inputs"]
        if kind in ("CheckpointLoaderSimple", "UNETLoader"):
            entry = tiny("GNRITestTinyModel", family=family, dtype="fp32", seed=0)
        elif kind == "DualCLIPLoader":
            entry = tiny("GNRITestTinyModel", family="eps", dtype="fp32", seed=0)
            redirect[(node_id, 0)] = [node_id, 1]
        elif kind == "VAELoader":
            continue
        elif kind == "LoadImage":
            entry = tiny("EmptyImage", width=128, height=128, batch_size=1, color=8421504)
        elif kind == "VAEEncode":
            entry = tiny("GNRITestLatent", family=family, batch=1, width=128, height=128, seed=0)
        elif kind == "VAEDecode":
            entry = tiny("GNRITestDecode", samples=inputs["samples"])
        elif kind == "CLIPTextEncode" and family == "flow":
            entry = tiny("GNRITestConditioning", family="flow", batch=1, seed=len(inputs["text"]), length=8)
        prompt[node_id] = entry
    return redirected(prompt, redirect)


# The world scene the edit workflows run on (tests/test_world.py's colour edit): the scene
# seed (size and position), its caption and the edited caption.
WORLD_EDIT = (0, "a red circle on a blue background", "a yellow circle on a blue background")
WORLD_FAMILY = {"eps": "unet", "flow": "flux"}


def world_prompt(workflow: dict, node_classes: dict) -> dict:
    """The workflow's API prompt on the trained world models: loaders -> GNRI World Loader,
    the photo -> WORLD_EDIT's scene (its MASK too), VAE -> the world's exact "VAE", the
    workflow's source/target texts -> the scene's caption and the edited one; every other
    node and widget as shipped. Adds ``score/recon`` and ``score/edit`` (GNRI World Score
    of the regenerated and the edited image against the scene, outside its object mask)."""
    from example_workflow_specs import SOURCE, TARGET

    family = WORLD_FAMILY[workflow["extra"]["gnri_test_family"]]
    seed, source, target = WORLD_EDIT
    texts = {SOURCE: source, TARGET: target}
    api = workflow_api(workflow, node_classes)
    scene = next(i for i, e in api.items() if e["class_type"] == "LoadImage")
    prompt, redirect = {}, {}
    for node_id, entry in api.items():
        kind, inputs = entry["class_type"], entry["inputs"]
        if kind in ("CheckpointLoaderSimple", "UNETLoader"):
            entry = tiny("GNRIWorldLoader", family=family)
        elif kind == "DualCLIPLoader":
            loader = next(i for i, e in api.items() if e["class_type"] == "UNETLoader")
            redirect[(node_id, 0)] = [loader, 1]
            continue
        elif kind == "VAELoader":
            continue
        elif kind == "LoadImage":
            entry = tiny("GNRIWorldScene", seed=seed, caption=source)
        elif kind == "VAEEncode":
            entry = tiny("GNRIWorldEncode", pixels=inputs["pixels"], family=family)
        elif kind == "VAEDecode":
            entry = tiny("GNRIWorldDecode", samples=inputs["samples"], family=family)
            branch = {"SamplerCustomAdvanced": "recon", "GNRIPromptSwapEdit": "edit"}.get(
                api[inputs["samples"][0]]["class_type"])
            if branch:
                prompt[f"score/{branch}"] = tiny("GNRIWorldScore", image=[node_id, 0],
                                                 caption=target if branch == "edit" else source,
                                                 reference=[scene, 0], mask=[scene, 1])
        else:
            entry = tiny(kind, **{k: texts.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()})
        prompt[node_id] = entry
    return redirected(prompt, redirect)


def redirected(prompt: dict, redirect: dict) -> dict:
    """``prompt`` with every link to a (node id, slot) key of ``redirect`` sent to its value."""
    for entry in prompt.values():
        for name, value in entry["inputs"].items():
            if isinstance(value, list) and (value[0], value[1]) in redirect:
                entry["inputs"][name] = redirect[(value[0], value[1])]
    return prompt


def tiny(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs}


def workflow_api(workflow, node_classes):
    return workflows.ui_to_api(workflow, node_classes)


def test_workflows_exist():
    names = " ".join(FILES)
    for part in ("SD1.5 invert", "SDXL-Turbo", "Flux", "Reconstruction check", "interpolate", "concept"):
        assert part in names, FILES


@pytest.mark.parametrize("name", FILES)
def test_workflow_is_current(comfy_nodes, name):
    """The committed file equals what scripts/workflows.py generates (no stale widget lists)."""
    from example_workflow_specs import WORKFLOWS
    nodes, extra = WORKFLOWS[name]
    assert workflows.build_ui(nodes, comfy_nodes.NODE_CLASS_MAPPINGS, extra) == load(name)


@pytest.mark.server
@pytest.mark.parametrize("name", FILES)
def test_workflow_node_types_exist_in_server(comfy_server, name):
    info = comfy_server.object_info()
    missing = {n["type"] for n in load(name)["nodes"]} - set(info) - workflows.FRONTEND_ONLY
    assert not missing


@pytest.mark.server
@pytest.mark.parametrize("name", FILES)
def test_workflow_runs_on_tiny_models_through_server(comfy_server, comfy_nodes, name):
    prompt = tiny_prompt(load(name), comfy_nodes.NODE_CLASS_MAPPINGS)
    entry = comfy_server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"], "no output node produced anything"


SD15, TURBO, FLUX = (f"GNRI - {n}.json" for n in ("SD1.5 invert, reconstruct, edit", "SDXL-Turbo real-time edit",
                                                  "Flux.1-schnell real-time edit"))
# PSNR thresholds (dB, against the source outside the object's true mask) of the
# reconstruction and the edit, 5-20 dB under what the shipped weights (UNet step 15615,
# Flux step 29282) give on WORLD_EDIT's scene (recon / edit): SD1.5 workflow on the world
# UNet 70.4 / 27.6 (50 steps, edit cfg 1, no mask), SDXL-Turbo's 22.9 / 25.4 (4 steps, mask),
# Flux.1-schnell's on the world Flux 38.1 / 31.0 (4 steps, mask threshold 0.45); every edit
# keeps the shape.
WORLD_PSNR = {SD15: (50.0, 20.0), TURBO: (15.0, 20.0), FLUX: (25.0, 25.0)}


@pytest.mark.server
@pytest.mark.parametrize("name", [SD15, TURBO, FLUX])
def test_edit_workflow_edits_on_world_models_through_server(comfy_server, comfy_nodes, name):
    """The shipped edit workflow, every GNRI node and setting as shipped, on the trained
    world model of its family: the reconstruction reproduces the scene, the edit gives
    the object the target colour and keeps the background."""
    prompt = world_prompt(load(name), comfy_nodes.NODE_CLASS_MAPPINGS)
    outputs = comfy_server.run(prompt, timeout=120)["outputs"]
    recon, edit = (outputs[f"score/{b}"]["gnri_world"][0] for b in ("recon", "edit"))
    recon_psnr, edit_psnr = WORLD_PSNR[name]
    assert all(recon["correct"][0].values()) and recon["psnr_outside"][0] > recon_psnr, recon
    assert all(edit["correct"][0].values()), edit  # target colour, shape and background kept
    assert edit["psnr_outside"][0] > edit_psnr, edit


@pytest.mark.server
def test_reconstruction_check_workflow_on_world_unet_through_server(comfy_server, comfy_nodes):
    """The shipped reconstruction-check workflow on the trained world UNet: GNRI's
    regeneration reproduces the scene (measured 22.9 dB outside the object at its 4 steps,
    every attribute right)."""
    name = "GNRI - Reconstruction check.json"
    outputs = comfy_server.run(world_prompt(load(name), comfy_nodes.NODE_CLASS_MAPPINGS), timeout=120)["outputs"]
    recon = outputs["score/recon"]["gnri_world"][0]
    assert all(recon["correct"][0].values()) and recon["psnr_outside"][0] > 15.0, recon


@pytest.mark.server
@pytest.mark.parametrize("name", [TURBO, FLUX])
def test_real_time_workflow_inverts_once_per_photo(comfy_server, comfy_nodes, name):
    """A new target prompt re-runs the edit and its mask, not GNRI Invert (ComfyUI caches it):
    the inversion and its round-trip check are paid once per photo, not per edit."""
    prompt = tiny_prompt(load(name), comfy_nodes.NODE_CLASS_MAPPINGS)
    comfy_server.run(prompt, timeout=120)
    edit = next(e for e in prompt.values() if e["class_type"] == "GNRIPromptSwapEdit")
    target = prompt[edit["inputs"]["target"][0]]["inputs"]  # CLIPTextEncode, or flow's test conditioning
    if "text" in target:
        target["text"] = target["text"].replace("dog", "fox")
    else:
        target["seed"] += 1
    entry = comfy_server.run(prompt, timeout=120)
    cached = {n for event, data in entry["status"]["messages"] if event == "execution_cached"
              for n in data.get("nodes", [])}
    kinds = {i: e["class_type"] for i, e in prompt.items()}
    assert {kinds[i] for i in cached} >= {"GNRIInvert"}
    assert not {"GNRIPromptSwapEdit", "GNRIAttentionMaskBlend"} & {kinds[i] for i in cached}
