"""Tests of the test harness itself: tiny models, the in-process executor, the server."""
from __future__ import annotations

import pytest
import torch

from conftest import PromptExecutionError, PromptValidationError, unet_prompt
from gnri_testing import tiny_models


def _model_space_std(model, latent):
    return model.model.process_latent_in(latent).std().item()


@pytest.mark.parametrize("family", ["eps", "v", "flow"])
def test_tiny_model_stock_sampling_is_finite_and_well_scaled(family, request, tiny_clip):
    import comfy.model_sampling as ms

    model = request.getfixturevalue({"eps": "tiny_eps", "v": "tiny_v", "flow": "tiny_flux"}[family])
    sampling = model.get_model_object("model_sampling")
    expected = {"eps": ms.EPS, "v": ms.V_PREDICTION, "flow": ms.CONST}[family]
    assert isinstance(sampling, expected)
    if family == "flow":
        assert not isinstance(sampling, ms.EPS) and sampling.sigma_max.item() == pytest.approx(1.0)
        positive = tiny_models.flux_conditioning(1, seed=0)
    else:
        cond, pooled = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a photo of a cat"), return_pooled=True)
        positive = [[cond, {"pooled_output": pooled}]]
    latent = tiny_models.random_latent(family, batch=2, h=8, w=8, seed=1)
    assert latent.shape == (2, tiny_models.LATENT_CHANNELS[family], 8, 8)
    assert 0.8 < _model_space_std(model, latent) < 1.2

    out = tiny_models.sample(model, latent, positive, steps=6, sampler_name="euler", seed=3)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert 0.1 < _model_space_std(model, out) < 5.0
    again = tiny_models.sample(model, latent, positive, steps=6, sampler_name="euler", seed=3)
    assert torch.equal(out, again)  # deterministic

    partial = tiny_models.sample(model, latent, positive, steps=4, denoise=0.5, seed=3)
    assert torch.isfinite(partial).all() and 0.1 < _model_space_std(model, partial) < 5.0


def test_tiny_models_are_deterministic_and_initialised():
    a, b = tiny_models.tiny_flux_model(seed=5), tiny_models.tiny_flux_model(seed=5)
    c = tiny_models.tiny_flux_model(seed=6)
    sa, sb, sc = (m.model.diffusion_model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for m in (a, tiny_models.tiny_eps_model(seed=5)):
        for name, p in m.model.named_parameters():
            assert torch.isfinite(p).all(), name
            assert p.abs().max() < 10, name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("family", ["eps", "flow"])
def test_tiny_model_low_precision_denoiser(family, dtype):
    model = tiny_models.tiny_model(family, dtype=dtype)
    assert next(model.model.diffusion_model.parameters()).dtype == tiny_models.DTYPES[dtype]
    latent = model.model.process_latent_in(tiny_models.random_latent(family, 1, 8, 8, seed=0))
    if family == "flow":
        context = tiny_models.flux_conditioning(1, 0)[0]
        kwargs = {"c_crossattn": context[0], "y": context[1]["pooled_output"]}
    else:
        kwargs = {"c_crossattn": torch.randn(1, 77, 768)}
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        out = model.model.apply_model(latent + 0.5 * torch.randn_like(latent), sigma, **kwargs)
    assert torch.isfinite(out).all() and 0.05 < out.float().std().item() < 10


def test_tiny_clip_is_real_sd1_clip(tiny_clip):
    import comfy.sd
    import comfy.sd1_clip

    assert isinstance(tiny_clip, comfy.sd.CLIP)
    assert isinstance(tiny_clip.cond_stage_model, comfy.sd1_clip.SD1ClipModel)
    assert isinstance(tiny_clip.tokenizer, comfy.sd1_clip.SD1Tokenizer)
    a, pa = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a photo of a cat"), return_pooled=True)
    b = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a painting of a dog"))
    assert a.shape == (1, 77, 768) and pa.shape == (1, 768)
    assert torch.isfinite(a).all() and 0.5 < a.std().item() < 2
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("family", ["eps", "v", "flow"])
def test_executor_runs_stock_sampling_prompt(executor, family):
    ui = executor.run(unet_prompt(family, steps=2, cfg=2.0, batch=2))
    stats = ui["9"]["gnri_stats"][0]
    assert stats["finite"] and stats["shape"] == [2, tiny_models.LATENT_CHANNELS[family], 8, 8]
    assert 0 < stats["rms"] < 10 * stats["rms_a"]
    (sampled,) = executor.node_output("5")
    assert torch.isfinite(sampled["samples"]).all()
    model, clip = executor.node_output("1")
    assert model.model.model_type.name == {"eps": "EPS", "v": "V_PREDICTION", "flow": "FLOW"}[family]
    assert any(e.get("node") == "5" for e in executor.events("progress"))  # KSampler's ProgressBar


def test_executor_models_are_cached_inference_tensors(executor):
    executor.run(unet_prompt("flow", steps=1))
    first = executor.node_output("1")[0]
    executor.run(unet_prompt("flow", steps=1, seed=7))
    assert executor.node_output("1")[0] is first
    assert next(first.model.parameters()).is_inference()  # as weights from ComfyUI's loaders


def test_executor_reports_validation_errors_naming_inputs(executor):
    prompt = unet_prompt("eps")
    prompt["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    del prompt["5"]["inputs"]["steps"]
    with pytest.raises(PromptValidationError) as info:
        executor.run(prompt)
    text = str(info.value)
    assert "KSampler #5" in text and "'sampler_name'" in text and "steps" in text
    assert "5" in info.value.node_errors


def test_executor_reports_node_exceptions(executor):
    prompt = unet_prompt("eps")
    prompt["4b"] = {"class_type": "GNRITestLatent",
                    "inputs": {"family": "eps", "batch": 1, "width": 128, "height": 64, "seed": 0}}
    prompt["9"]["inputs"]["latent_b"] = ["4b", 0]
    with pytest.raises(PromptExecutionError) as info:
        executor.run(prompt)
    err = info.value
    assert err.node_type == "GNRITestLatentStats" and err.node_id == "9"
    assert err.exception_type == "ValueError" and "latent shapes differ" in err.exception_message
    assert "GNRITestLatentStats #9 raised ValueError" in str(err)


def test_executor_interrupt(executor):
    import nodes

    def stop(value, total, node_id):
        if value >= 1:
            nodes.interrupt_processing()

    with pytest.raises(PromptExecutionError) as info:
        executor.run(unet_prompt("flow", steps=4), on_progress=stop)
    assert info.value.interrupted
    executor.run(unet_prompt("flow", steps=1))  # usable again afterwards


def test_server_lists_nodes_and_runs_a_prompt(comfy_server):
    info = comfy_server.object_info()
    for name in ("GNRITestTinyModel", "GNRITestConditioning", "GNRITestLatent", "GNRITestLatentStats", "KSampler"):
        assert name in info
    assert info["GNRITestTinyModel"]["input"]["required"]["family"][0] == ["eps", "v", "flow"]

    entry = comfy_server.run(unet_prompt("eps", steps=2), timeout=60)
    assert entry["status"]["status_str"] == "success"
    stats = entry["outputs"]["9"]["gnri_stats"][0]
    assert stats["finite"] and stats["shape"] == [1, 4, 8, 8] and stats["rms"] > 0

    prompt_id = comfy_server.queue(unet_prompt("flow", steps=2))
    entry = comfy_server.wait(prompt_id, timeout=60)
    assert entry["outputs"]["9"]["gnri_stats"][0]["shape"] == [1, 16, 8, 8]

    bad = unet_prompt("eps")
    bad["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(PromptValidationError, match="sampler_name"):
        comfy_server.queue(bad)
