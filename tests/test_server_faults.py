"""The real ComfyUI server (HTTP API on 127.0.0.1) under faults: bad inputs, /interrupt
during a long inversion, 50 inversion+edit prompts in a row (resident memory, no
patches leaking onto the user's model), fp16/bf16 models and batches.

Every bad prompt must come back as a node error that names the input (in /history for
errors raised while running; in POST /prompt's node_errors for what ComfyUI's own
validation rejects), and the server must run the next good prompt.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import requests
from conftest import PromptValidationError

pytestmark = pytest.mark.server

SOURCE_TEXT = "a photo of a cat on a sofa"
TARGET_TEXT = "a photo of a dog on a sofa"


# ----------------------------------------------------------------------------- prompts

def tiny(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs}


def base_nodes(family: str = "eps", *, dtype: str = "fp32", model_seed: int = 0, latent_seed: int = 0,
               batch: int = 1, prompt_batch: int = 0, size: int = 128) -> dict:
    """Tiny model, source/target prompts and a latent.  ``prompt_batch`` > 0: random
    conditioning with that many prompts (flow always uses random conditioning)."""
    nodes = {"model": tiny("GNRITestTinyModel", family=family, dtype=dtype, seed=model_seed),
             "latent": tiny("GNRITestLatent", family="flow" if family == "flow" else "eps", batch=batch,
                            width=size, height=size, seed=latent_seed)}
    if family == "flow" or prompt_batch:
        cond_family = "flow" if family == "flow" else "eps"
        n = prompt_batch or 1
        nodes["positive"] = tiny("GNRITestConditioning", family=cond_family, batch=n, seed=0, length=8)
        nodes["target"] = tiny("GNRITestConditioning", family=cond_family, batch=n, seed=5, length=8)
    else:
        nodes["positive"] = tiny("CLIPTextEncode", clip=["model", 1], text=SOURCE_TEXT)
        nodes["target"] = tiny("CLIPTextEncode", clip=["model", 1], text=TARGET_TEXT)
    return nodes


def invert(steps: int = 3, iterations: int = 2, method: str = "gnri", **extra) -> dict:
    inputs = dict(model=["model", 0], positive=["positive", 0], latent=["latent", 0], steps=steps,
                  scheduler="simple", cfg=1.0, method=method, iterations=iterations, tolerance=0.0, lam=0.1,
                  sampler="euler", newton_form="secant", noise_seed=0)
    inputs.update(extra)
    return {"class_type": "GNRIInvert", "inputs": inputs}


def edit(**extra) -> dict:
    inputs = dict(model=["model", 0], inversion=["invert", 3], source=["positive", 0], target=["target", 0],
                  strength=1.0, edit_cfg=1.0, negative_mode="source", start_step=0)
    inputs.update(extra)
    return {"class_type": "GNRIPromptSwapEdit", "inputs": inputs}


def stats(a: str = "latent", b: str = "edit") -> dict:
    return tiny("GNRITestLatentStats", latent_a=[a, 0], latent_b=[b, 0])


def invert_edit_prompt(family: str = "eps", *, steps: int = 3, iterations: int = 2, strength: float = 1.0,
                       **base) -> dict:
    return {**base_nodes(family, **base), "invert": invert(steps, iterations),
            "edit": edit(strength=strength), "stats": stats()}


def good_prompt() -> dict:
    return invert_edit_prompt(steps=2, iterations=1, strength=0.0, latent_seed=int(uuid.uuid4().int % 10**6))


def mask_nodes(batch: int = 1) -> dict:
    """A 128x128 MASK with 1 on the left half; ``batch`` copies."""
    nodes = {"mask_zero": tiny("SolidMask", value=0.0, width=128, height=128),
             "mask_one": tiny("SolidMask", value=1.0, width=64, height=128),
             "mask1": tiny("MaskComposite", destination=["mask_zero", 0], source=["mask_one", 0], x=0, y=0,
                           operation="add")}
    if batch == 1:
        nodes["mask"] = tiny("MaskComposite", destination=["mask1", 0], source=["mask_zero", 0], x=0, y=0,
                             operation="add")
    else:
        nodes["mask_image"] = tiny("MaskToImage", mask=["mask1", 0])
        nodes["images"] = tiny("RepeatImageBatch", image=["mask_image", 0], amount=batch)
        nodes["mask"] = tiny("ImageToMask", image=["images", 0], channel="red")
    return nodes


# ----------------------------------------------------------------------------- helpers

def queue_raw(server, prompt: dict) -> str:
    """POST /prompt with the JSON as a client may send it (NaN and Infinity allowed;
    requests' json= refuses them)."""
    r = requests.post(server.base_url + "/prompt", data=json.dumps({"prompt": prompt, "client_id": "gnri-faults"}),
                      headers={"Content-Type": "application/json"}, timeout=30)
    if r.status_code != 200:
        raise server.rejected(r.json())
    return r.json()["prompt_id"]


def history_error(server, prompt: dict, timeout: float = 60.0) -> dict:
    """Queue ``prompt`` (it must pass validation), wait, and return the execution_error
    message stored in /history for it."""
    prompt_id = queue_raw(server, prompt)
    entry = server.wait(prompt_id, timeout)
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors, entry["status"]
    return errors[0]


def assert_good_prompt_runs(server) -> None:
    entry = server.run(good_prompt())
    result = entry["outputs"]["stats"]["gnri_stats"][0]
    assert result["finite"], result


def write_latent(server, name: str, samples) -> str:
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"latent_tensor": samples.contiguous(), "latent_format_version_0": torch.tensor([])},
                                os.path.join(server.base_dir, "input", name))
    return name


def fetch_latent(server, entry: dict, node: str):
    import safetensors.torch

    info = entry["outputs"][node]["latents"][0]
    r = requests.get(server.base_url + "/view", params={**info}, timeout=30)
    r.raise_for_status()
    return safetensors.torch.load(r.content)["latent_tensor"]


def rss(server) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


# ----------------------------------------------------------------------------- bad inputs

def _nan_latent_prompt(server):
    import torch

    samples = torch.randn(1, 4, 16, 16) / 0.18215
    samples[0, 1, 3, 5] = float("nan")
    name = write_latent(server, f"gnri_nan_{uuid.uuid4().hex[:6]}.latent", samples)
    prompt = invert_edit_prompt()
    prompt["latent"] = tiny("LoadLatent", latent=name)
    return prompt


def _channels_prompt(server):
    prompt = invert_edit_prompt()
    prompt["latent"]["inputs"]["family"] = "flow"          # 16 channels into a 4-channel UNet
    return prompt


def _sigmas_prompt(server):
    # BasicScheduler's descending schedule with its first sigma set to 1.0: not monotonic
    prompt = invert_edit_prompt()
    prompt["sched"] = tiny("BasicScheduler", model=["model", 0], scheduler="simple", steps=4, denoise=1.0)
    prompt["bad_sigmas"] = tiny("SetFirstSigma", sigmas=["sched", 0], sigma=1.0)
    prompt["invert"]["inputs"]["sigmas"] = ["bad_sigmas", 0]
    return prompt


def _mask_batch_prompt(server):
    prompt = {**invert_edit_prompt(batch=3), **mask_nodes(batch=2)}
    prompt["edit"]["inputs"]["mask"] = ["mask", 0]
    return prompt


def _unknown_method_prompt(server):
    # ComfyUI 0.3.75 does not check V3 combo values at validation: the node rejects it
    prompt = invert_edit_prompt()
    prompt["invert"]["inputs"]["method"] = "x"
    return prompt


def _sampler_unknown_method_prompt(server):
    prompt = invert_edit_prompt()
    prompt["nr"] = tiny("GuidedNRSampler", method="magic", iterations=2, tolerance=0.0, lam=0.1, sampler="euler",
                        newton_form="secant")
    prompt["sched"] = tiny("BasicScheduler", model=["model", 0], scheduler="simple", steps=2, denoise=1.0)
    prompt["nr_use"] = tiny("SamplerCustom", model=["model", 0], add_noise=False, noise_seed=0, cfg=1.0,
                            positive=["positive", 0], negative=["positive", 0], sampler=["nr", 0],
                            sigmas=["sched", 0], latent_image=["latent", 0])
    prompt["stats"] = stats(b="nr_use")
    return prompt


def _other_family_prompt(server):
    prompt = invert_edit_prompt("flow")                    # a flow model's INVERSION ...
    prompt["eps_model"] = tiny("GNRITestTinyModel", family="eps", dtype="fp32", seed=0)
    prompt["edit"]["inputs"]["model"] = ["eps_model", 0]   # ... given to an EPS model
    return prompt


def _empty_sigmas_prompt(server):
    prompt = invert_edit_prompt()
    prompt["sched"] = tiny("BasicScheduler", model=["model", 0], scheduler="simple", steps=4, denoise=0.0)
    prompt["invert"]["inputs"]["sigmas"] = ["sched", 0]
    return prompt


def _nan_widget_prompt(node: str, name: str):
    def build(server):
        prompt = invert_edit_prompt()
        prompt[node]["inputs"][name] = float("nan")
        return prompt
    return build


def _other_weights_prompt(server):
    prompt = invert_edit_prompt()                           # inverted with the seed-0 model ...
    prompt["other_model"] = tiny("GNRITestTinyModel", family="eps", dtype="fp32", seed=1)
    prompt["edit"]["inputs"]["model"] = ["other_model", 0]  # ... edited with other weights of its kind
    return prompt


def _other_weights_mask_prompt(server):
    prompt = _other_weights_prompt(server)
    info = server.object_info()["GNRIAttentionMaskBlend"]
    prompt["attn"] = attention_node(info)
    prompt["attn"]["inputs"]["model"] = ["other_model", 0]
    prompt["attn_image"] = tiny("MaskToImage", mask=["attn", 0])
    prompt["attn_preview"] = tiny("PreviewImage", images=["attn_image", 0])
    del prompt["edit"], prompt["stats"]
    prompt["stats"] = stats(b="invert")
    return prompt


def _flow_autograd_prompt(server):
    prompt = invert_edit_prompt("flow")
    prompt["invert"]["inputs"]["newton_form"] = "paper_autograd"
    return prompt


EXECUTION_ERRORS = {
    # case: (prompt builder, node that fails, words the message must contain)
    "latent_channels": (_channels_prompt, "invert", ["latent:", "16 channels", "expects 4"]),
    "nan_latent": (_nan_latent_prompt, "invert", ["latent:", "NaN"]),
    # the sigmas as given (descending, first set to 1), not flipped
    "non_monotonic_sigmas": (_sigmas_prompt, "invert", ["sigmas", "strictly descending", "got [1.0, "]),
    "empty_sigmas": (_empty_sigmas_prompt, "invert", ["sigmas:", "at least 2 values", "got 0", "denoise 0"]),
    "nan_strength": (_nan_widget_prompt("edit", "strength"), "edit", ["strength: must be a finite number", "nan"]),
    "nan_edit_cfg": (_nan_widget_prompt("edit", "edit_cfg"), "edit", ["edit_cfg: must be a finite number"]),
    "nan_cfg": (_nan_widget_prompt("invert", "cfg"), "invert", ["cfg: must be a finite number"]),
    "nan_tolerance": (_nan_widget_prompt("invert", "tolerance"), "invert", ["tolerance: must be a finite number"]),
    "nan_lam": (_nan_widget_prompt("invert", "lam"), "invert", ["lam: must be a finite number"]),
    "inversion_other_weights": (_other_weights_prompt, "edit", ["inversion:", "other weights"]),
    "mask_other_weights": (_other_weights_mask_prompt, "attn", ["inversion:", "other weights"]),
    "flow_paper_autograd": (_flow_autograd_prompt, "invert",
                            ["newton_form: paper_autograd", "UNet", "Use secant (the default) or paper_detached."]),
    "mask_batch": (_mask_batch_prompt, "edit", ["mask:", "batch of 2 masks", "3"]),
    "inversion_other_family": (_other_family_prompt, "edit", ["inversion:", "made with a flow model"]),
    "unknown_method": (_unknown_method_prompt, "invert", ["unknown method 'x'", "gnri"]),
    "sampler_unknown_method": (_sampler_unknown_method_prompt, "nr", ["unknown method 'magic'"]),
}


@pytest.mark.parametrize("case", list(EXECUTION_ERRORS))
def test_bad_input_is_a_node_error_in_history(comfy_server, case):
    build, node, words = EXECUTION_ERRORS[case]
    error = history_error(comfy_server, build(comfy_server))
    assert error["node_id"] == node, error
    message = error["exception_message"]
    for word in words:
        assert word in message, message
    assert "Traceback" not in message
    assert_good_prompt_runs(comfy_server)


def _empty_latent_prompt(server):
    prompt = invert_edit_prompt()
    prompt["latent"] = tiny("EmptyLatentImage", width=128, height=128, batch_size=1)
    return prompt


def _blend_cfg_without_mask_prompt(server):
    prompt = invert_edit_prompt()
    prompt["edit"]["inputs"]["blend_cfg"] = 2.0
    return prompt


WARNINGS = {
    # case: (prompt builder, node that warns, words its text on the node must contain)
    "empty_latent": (_empty_latent_prompt, "invert", ["warning: latent: all zeros", "EmptyLatentImage"]),
    "blend_cfg_without_mask": (_blend_cfg_without_mask_prompt, "edit", ["warning: blend_cfg: needs a mask"]),
    # (other latent seeds: a cached prompt would not run the edit node again)
    "prompt_batch_2_latent_batch_3_invert": (lambda s: invert_edit_prompt(batch=3, prompt_batch=2, latent_seed=4),
                                             "invert", ["warning: positive: 2 prompts for a latent batch of 3",
                                                        "image 3 gets prompt 1"]),
    "prompt_batch_2_latent_batch_3_edit": (lambda s: invert_edit_prompt(batch=3, prompt_batch=2, latent_seed=5),
                                           "edit", ["warning: source: 2 prompts", "warning: target: 2 prompts",
                                                    "image 3 gets prompt 1"]),
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_odd_input_runs_with_a_warning_on_the_node(comfy_server, case):
    build, node, words = WARNINGS[case]
    entry = comfy_server.run(build(comfy_server))
    text = "\n".join(entry["outputs"][node]["text"])
    for word in words:
        assert word in text, text


def test_good_input_has_no_warning(comfy_server):
    entry = comfy_server.run(good_prompt())
    assert entry["outputs"]["edit"]["text"] == [""]
    assert "warning" not in entry["outputs"]["invert"]["text"][0]
    assert "model calls" in entry["outputs"]["invert"]["text"][0]


def test_comfyui_without_v3_api_logs_the_minimum_version(tmp_path):
    """A ComfyUI without comfy_api.latest: one clear log line, no nodes; without any
    ComfyUI (plain gnri_core users): silence."""
    from gnri_testing import comfy_env

    loader = ("import importlib.util, logging, os, sys\n"
              "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
              "root = sys.argv[1]\n"
              "spec = importlib.util.spec_from_file_location('ComfyUI-GNRI', os.path.join(root, '__init__.py'),\n"
              "                                              submodule_search_locations=[root])\n"
              "module = importlib.util.module_from_spec(spec)\n"
              "sys.modules['ComfyUI-GNRI'] = module\n"
              "spec.loader.exec_module(module)\n"
              "print('entrypoint', hasattr(module, 'comfy_entrypoint'))\n")
    old_comfy = tmp_path / "old_comfyui"
    for package in ("comfy", "comfy_api"):
        (old_comfy / package).mkdir(parents=True)
        (old_comfy / package / "__init__.py").write_text("")
    runs = {}
    for name, path in (("old", str(old_comfy)), ("none", str(tmp_path))):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = path
        runs[name] = subprocess.run([sys.executable, "-c", loader, comfy_env.REPO_ROOT], capture_output=True,
                                    text=True, env=env, cwd=str(tmp_path), timeout=120)
    old, none = runs["old"], runs["none"]
    assert "entrypoint False" in old.stdout, old.stdout + old.stderr
    lines = [line for line in old.stderr.splitlines() if "ComfyUI-GNRI" in line]
    assert len(lines) == 1 and "comfy_api.latest" in lines[0] and "ComfyUI 0.3.48 or newer" in lines[0], old.stderr
    assert "entrypoint False" in none.stdout and none.stderr == "", none.stdout + none.stderr


VALIDATION_ERRORS = {
    # ComfyUI's own validation rejects these before running: POST /prompt answers 400
    # with node_errors (nothing reaches /history)
    "steps_0": (lambda p: p["invert"]["inputs"].update(steps=0), "invert", "steps"),
    "iterations_0": (lambda p: p["invert"]["inputs"].update(iterations=0), "invert", "iterations"),
}


@pytest.mark.parametrize("case", list(VALIDATION_ERRORS))
def test_rejected_input_names_the_input(comfy_server, case):
    change, node, input_name = VALIDATION_ERRORS[case]
    prompt = invert_edit_prompt()
    change(prompt)
    with pytest.raises(PromptValidationError) as info:
        comfy_server.queue(prompt)
    errors = info.value.node_errors[node]["errors"]
    assert any((e.get("extra_info") or {}).get("input_name") == input_name for e in errors), errors
    assert_good_prompt_runs(comfy_server)


# ----------------------------------------------------------------------------- interrupt

def test_interrupt_stops_a_long_inversion_within_one_iteration(comfy_server):
    # per-iteration cost on this machine (each solver iteration = one model call)
    timing = {**base_nodes(size=256), "invert": invert(steps=2, iterations=10), "stats": stats(b="invert")}
    t0 = time.monotonic()
    comfy_server.run(timing)
    per_call = (time.monotonic() - t0) / 20

    long = {**base_nodes(size=256, latent_seed=11), "invert": invert(steps=10, iterations=100),
            "stats": stats(b="invert")}
    expected_full = 1000 * per_call
    prompt_id = comfy_server.queue(long)
    deadline = time.monotonic() + 30
    while not comfy_server.get("/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the long prompt never started"
        time.sleep(0.05)
    time.sleep(1.0 + 5 * per_call)          # the tiny model is cached: by now GNRI Invert is iterating
    t_interrupt = time.monotonic()
    requests.post(comfy_server.base_url + "/interrupt", timeout=10).raise_for_status()
    entry = comfy_server.wait(prompt_id, timeout=60)
    latency = time.monotonic() - t_interrupt
    events = dict(entry["status"]["messages"])
    assert "execution_interrupted" in events, entry["status"]
    assert events["execution_interrupted"]["node_id"] == "invert", events["execution_interrupted"]
    print(f"\ninterrupt: stopped {latency:.2f} s after /interrupt (one model call ~{per_call * 1000:.0f} ms; "
          f"the whole inversion would take ~{expected_full:.0f} s)")
    # /history is polled every 0.1 s; one iteration is ~per_call
    assert latency < 0.5 + 3 * per_call, (latency, per_call)
    assert_good_prompt_runs(comfy_server)


# ----------------------------------------------------------------------------- soak

MODEL_SEED = 7   # a model no other test touches: its first use below is the plain KSampler


def plain_ksampler_prompt(tag: str) -> dict:
    """The user's model into a stock KSampler (no pack node), saved as a .latent file."""
    return {
        "p_model": tiny("GNRITestTinyModel", family="eps", dtype="fp32", seed=MODEL_SEED),
        "p_pos": tiny("CLIPTextEncode", clip=["p_model", 1], text=SOURCE_TEXT),
        "p_neg": tiny("CLIPTextEncode", clip=["p_model", 1], text=""),
        "p_latent": tiny("GNRITestLatent", family="eps", batch=1, width=128, height=128, seed=3),
        "p_sample": tiny("KSampler", model=["p_model", 0], positive=["p_pos", 0], negative=["p_neg", 0],
                         latent_image=["p_latent", 0], seed=5, steps=4, cfg=3.0, sampler_name="euler",
                         scheduler="normal", denoise=0.8),
        "p_save": tiny("SaveLatent", samples=["p_sample", 0], filename_prefix=f"gnri_plain_{tag}"),
    }


def soak_prompt(i: int, attention: dict | None) -> dict:
    """Inversion + masked edit with blended CFG (a patched clone of the model) and,
    when the pack has it, Attention Mask Blend (attention patches)."""
    prompt = {**invert_edit_prompt(model_seed=MODEL_SEED, latent_seed=1000 + i, steps=2, iterations=2,
                                   strength=0.5 + 0.01 * i), **mask_nodes()}
    prompt["edit"]["inputs"].update(mask=["mask", 0], blend_cfg=2.0, edit_cfg=1.5)
    if attention is not None:
        prompt["attn"] = attention_node(attention)
        prompt["edit"]["inputs"]["mask"] = ["attn", 0]
    return prompt


def attention_node(info: dict) -> dict:
    """AttentionMaskBlend with its widgets at their defaults (prompts set) and the links."""
    links = {"model": ["model", 0], "clip": ["model", 1], "inversion": ["invert", 3]}
    texts = {"source_prompt": SOURCE_TEXT, "target_prompt": TARGET_TEXT}
    inputs = {}
    for name, spec in info["input"].get("required", {}).items():
        options = spec[1] if len(spec) > 1 else {}
        if name in links:
            inputs[name] = links[name]
        elif name in texts:
            inputs[name] = texts[name]
        elif isinstance(spec[0], list):
            inputs[name] = options.get("default", spec[0][0])
        elif "default" in options:
            inputs[name] = options["default"]
        else:
            raise AssertionError(f"AttentionMaskBlend input {name!r} ({spec[0]}) has no default to use here")
    return tiny("GNRIAttentionMaskBlend", **inputs)


def test_fifty_inversion_edit_prompts_no_memory_growth_no_leaked_patches(comfy_server):
    info = comfy_server.object_info()
    attention = info.get("GNRIAttentionMaskBlend")

    before = comfy_server.run(plain_ksampler_prompt("before"))
    reference = fetch_latent(comfy_server, before, "p_save")

    for i in range(5):                                   # warm-up: allocator pools, caches, lazy imports
        comfy_server.run(soak_prompt(i, attention))
    rss_warm = rss(comfy_server)
    t0 = time.monotonic()
    samples = []
    for i in range(5, 55):
        entry = comfy_server.run(soak_prompt(i, attention))
        assert entry["outputs"]["stats"]["gnri_stats"][0]["finite"]
        if i % 10 == 4:
            samples.append(rss(comfy_server))
    loop_s = time.monotonic() - t0
    rss_end = rss(comfy_server)
    growth_mb = (rss_end - rss_warm) / 2**20
    print(f"\n50 inversion+edit prompts in {loop_s:.1f} s; RSS after warm-up {rss_warm / 2**20:.1f} MiB, "
          f"after 50 prompts {rss_end / 2**20:.1f} MiB (growth {growth_mb:+.1f} MiB; "
          f"every 10: {[round(s / 2**20, 1) for s in samples]}); attention node: "
          f"{'GNRIAttentionMaskBlend' if attention else 'not in this pack version'}")
    assert growth_mb < RSS_GROWTH_BOUND_MB, growth_mb

    after = comfy_server.run(plain_ksampler_prompt("after"))
    cached = [d for e, d in after["status"]["messages"] if e == "execution_cached"]
    assert not cached or "p_sample" not in cached[0].get("nodes", []), "KSampler was not re-run"
    output = fetch_latent(comfy_server, after, "p_save")
    import torch

    assert torch.equal(output, reference), float((output - reference).abs().max())


RSS_GROWTH_BOUND_MB = 32   # measured: +5 MiB over 50 prompts after warm-up


# ----------------------------------------------------------------------------- dtypes and batches

@pytest.mark.parametrize("family", ["eps", "flow"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_models_invert_and_edit(comfy_server, family, dtype):
    reconstruct = comfy_server.run(invert_edit_prompt(family, dtype=dtype, steps=4, iterations=6, strength=0.0))
    rec = reconstruct["outputs"]["stats"]["gnri_stats"][0]
    edited = comfy_server.run(invert_edit_prompt(family, dtype=dtype, steps=4, iterations=6, strength=1.0))
    changed = edited["outputs"]["stats"]["gnri_stats"][0]
    assert rec["finite"] and changed["finite"]
    assert rec["rel_rms"] < 0.05, rec
    assert changed["rel_rms"] > 2 * rec["rel_rms"], (rec, changed)


@pytest.mark.parametrize("family,prompts", [("eps", 1), ("eps", 3), ("flow", 3)])
def test_batch_of_three(comfy_server, family, prompts):
    prompt = invert_edit_prompt(family, batch=3, prompt_batch=prompts if prompts > 1 else 0, steps=4,
                                iterations=8, strength=0.0)
    prompt["edited"] = prompt.pop("edit")
    prompt["edit"] = edit(strength=1.0)
    prompt["stats_rec"] = stats(b="edited")
    entry = comfy_server.run(prompt)
    rec = entry["outputs"]["stats_rec"]["gnri_stats"][0]
    changed = entry["outputs"]["stats"]["gnri_stats"][0]
    assert rec["shape"][0] == 3 and changed["shape"][0] == 3
    assert rec["rel_rms"] < 2e-2, rec
    assert changed["rel_rms"] > 3 * rec["rel_rms"], (rec, changed)
