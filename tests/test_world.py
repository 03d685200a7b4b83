"""The trained world (gnri_world): scenes, scorer, exact "VAE", and the shipped models
loaded and run in the real ComfyUI."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from gnri_testing import comfy_env
from gnri_world import latent, scenes, scorer

sys.path.insert(0, os.path.join(comfy_env.REPO_ROOT, "scripts"))


# ---------------------------------------------------------------- world, scorer, "VAE"

def test_world_is_deterministic_by_seed():
    a, b = scenes.sample_scenes(50, 3, p_two=0.3), scenes.sample_scenes(50, 3, p_two=0.3)
    assert a == b and a != scenes.sample_scenes(50, 4, p_two=0.3)
    assert torch.equal(scenes.render_batch(a), scenes.render_batch(b))
    assert [e.target for e in scenes.sample_edits(20, 1)] == [e.target for e in scenes.sample_edits(20, 1)]


def test_render_masks_and_caption():
    s = scenes.Scene((scenes.Obj("square", "red", 8, 8, 8),), "blue")
    img, masks = scenes.render(s)
    assert s.caption() == "a red square on a blue background"
    assert masks.shape == (1, 16, 16) and masks.sum().item() == pytest.approx(64.0)
    assert torch.allclose(img[8, 8], torch.tensor(scenes.PALETTE["red"]))
    assert torch.allclose(img[0, 0], torch.tensor(scenes.PALETTE["blue"]))


@pytest.mark.parametrize("kw", [{}, {"p_two": 1.0}, {"p_striped": 1.0}], ids=["one", "two", "striped"])
def test_scorer_reads_clean_scenes(kw):
    sc = scenes.sample_scenes(300, 11, **kw)
    acc = scorer.accuracy(scenes.render_batch(sc), sc)
    assert min(acc["shape"], acc["colour"], acc["background"]) >= 0.97, acc


def test_scorer_reads_position_and_size():
    s = scenes.Scene((scenes.Obj("circle", "green", 10, 6.5, 9.0),), "black")
    r = scorer.read(scenes.render(s)[0])[0]
    assert (r.cx, r.cy) == (pytest.approx(6.5, abs=0.1), pytest.approx(9.0, abs=0.1))
    assert r.area == pytest.approx(3.14159 * 25, rel=0.05)


@pytest.mark.parametrize("kind", scenes.EDIT_KINDS)
def test_edit_pairs_change_one_attribute(kind):
    for pair in scenes.sample_edits(40, 5, kinds=(kind,)):
        src, tgt = pair.source, pair.target
        assert src.caption() != tgt.caption() and pair.target_caption == tgt.caption()
        changed = {f for i, (a, b) in enumerate(zip(src.objects, tgt.objects))
                   for f in ("shape", "colour", "size", "cx", "cy") if getattr(a, f) != getattr(b, f)}
        assert len(changed) == (0 if kind == "background" else 1)
        assert (src.background != tgt.background) == (kind == "background")
        assert pair.mask().any()


def test_rare_combinations_are_rare_or_held_out():
    def count(weight):
        objs = [o for s in scenes.sample_scenes(3000, 0, rare_weight=weight) for o in s.objects]
        return sum((o.shape, o.colour) in scenes.RARE for o in objs)
    assert count(0.0) == 0 and 0 < count(0.1) < count(1.0) / 4


@pytest.mark.parametrize("family", latent.FAMILIES)
def test_latent_is_exact(family):
    img = scenes.render_batch(scenes.sample_scenes(8, 2))
    lat = latent.encode(img, family)
    assert lat.shape == (8, latent.channels(family), 16, 16)
    assert (latent.decode(lat, family) - img).abs().max() < 1e-5
    with pytest.raises(ValueError, match="family"):
        latent.encode(img, "sdxl")
    with pytest.raises(ValueError, match="latent"):
        latent.decode(lat[:, :3], family)


# ---------------------------------------------------------------- the models in ComfyUI

@pytest.mark.parametrize("family", ["unet", "flux"])
def test_world_nodes_encode_decode_exactly(executor, family):
    """Scene -> GNRI World Encode -> Decode -> Score: exact round trip, 8 px per cell."""
    caption = "a green triangle and a red square on a white striped background"
    ui = executor.run({
        "scene": {"class_type": "GNRIWorldScene", "inputs": {"seed": 1, "caption": caption}},
        "enc": {"class_type": "GNRIWorldEncode", "inputs": {"pixels": ["scene", 0], "family": family}},
        "dec": {"class_type": "GNRIWorldDecode", "inputs": {"samples": ["enc", 0], "family": family}},
        "score": {"class_type": "GNRIWorldScore", "inputs": {"image": ["dec", 0], "caption": caption,
                                                             "reference": ["scene", 0], "mask": ["scene", 1]}},
    })
    image, mask, text = executor.node_output("scene")
    assert image.shape == (1, 128, 128, 3) and mask.shape == (1, 128, 128) and text == caption
    assert executor.node_output("enc")[0]["samples"].shape == (1, latent.channels(family), 16, 16)
    result = ui["score"]["gnri_world"][0]
    assert all(result["correct"][0].values()) and result["psnr_outside"][0] > 100, result


def test_world_scene_node_rejects_a_bad_caption(executor):
    from conftest import PromptExecutionError

    with pytest.raises(PromptExecutionError, match="caption: expected"):
        executor.run({"scene": {"class_type": "GNRIWorldScene", "inputs": {"seed": 0, "caption": "a cat"}},
                      "save": {"class_type": "PreviewImage", "inputs": {"images": ["scene", 0]}}})

def generate_prompt(family: str, captions: list[str], seed: int) -> dict:
    """Loader -> CLIPTextEncode -> stock KSampler (shipped settings) -> decode -> score,
    one branch per caption."""
    from gnri_world.generate import SHIPPED

    s = SHIPPED[family]
    p = {"loader": {"class_type": "GNRIWorldLoader", "inputs": {"family": family}},
         "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["loader", 1], "text": ""}}}
    for i, caption in enumerate(captions):
        p[f"pos{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["loader", 1], "text": caption}}
        p[f"ks{i}"] = {"class_type": "KSampler", "inputs": {
            "model": ["loader", 0], "seed": seed, "steps": s["steps"], "cfg": s["cfg"],
            "sampler_name": s["sampler"], "scheduler": s["scheduler"], "positive": [f"pos{i}", 0],
            "negative": ["neg", 0], "latent_image": ["empty", 0], "denoise": 1.0}}
        p[f"dec{i}"] = {"class_type": "GNRIWorldDecode", "inputs": {"samples": [f"ks{i}", 0], "family": family}}
        p[f"score{i}"] = {"class_type": "GNRIWorldScore", "inputs": {"image": [f"dec{i}", 0], "caption": caption}}
    return p


# Pinned cases the shipped weights get right (found with seeds 0-2 over six captions): a
# regression check that the models load and sample as trained, not a quality measure
# (that is docs/world.md's 200-generation score).
GEN_CASES = {"unet": (2, ["a green square on a white background", "a blue triangle on a yellow background",
                          "a yellow square on a black background"]),
             "flux": (1, ["a red circle on a blue background", "a green square on a white background",
                          "a blue circle on a red background"])}


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_world_model_generates_the_caption_in_comfyui(executor, family):
    """Stock EmptyLatentImage + CLIPTextEncode + KSampler on the shipped model."""
    seed, captions = GEN_CASES[family]
    ui = executor.run(generate_prompt(family, captions, seed))
    for i, caption in enumerate(captions):
        result = ui[f"score{i}"]["gnri_world"][0]
        assert all(result["correct"][0].values()), (caption, result)


EDIT_CASES = {  # family -> (layout seed, source, target)
    "unet": (0, "a red circle on a blue background", "a yellow circle on a blue background"),
    "flux": (0, "a red circle on a blue background", "a yellow circle on a blue background"),
}


@pytest.mark.server
@pytest.mark.parametrize("family", ["unet", "flux"])
def test_colour_edit_through_the_server(comfy_server, family):
    """Scene -> GNRI Invert -> Attention Mask Blend -> Prompt Swap Edit over HTTP: the
    object takes the target colour, keeps its shape, and the background stays."""
    import demo

    seed, source, target = EDIT_CASES[family]
    outputs = comfy_server.run(demo.edit_prompt(family, source, target, seed, native=False), timeout=300)["outputs"]
    edit = outputs["score/gnri_edit"]["gnri_world"][0]
    recon = outputs["score/gnri_recon"]["gnri_world"][0]
    assert all(edit["correct"][0].values()), edit
    assert edit["psnr_outside"][0] > EDIT_PSNR, edit
    assert all(recon["correct"][0].values()) and recon["psnr_outside"][0] > RECON_PSNR[family], recon


# Background PSNR (dB, outside the object) measured on the shipped weights: edit 14.0 (unet),
# 18.1 (flux) -- Attention Mask Blend's mask does not localise yet (docs/world.md);
# reconstruction 42.2 (unet), 24.8 (flux).
EDIT_PSNR, RECON_PSNR = 12.0, {"unet": 35.0, "flux": 20.0}
