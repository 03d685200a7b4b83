"""The example workflows: their node types exist in the real server, and their
API-format equivalents run there on the tiny test models."""
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
