"""The example workflows, compactly: see ``workflows.py`` (which writes them)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from gnri_core import DEFAULTS  # noqa: E402  (the workflows show the core's defaults)


SMALL = {"VAEDecode", "VAEEncode", "ImageBatch", "MaskToImage", "FlipSigmas", "KSamplerSelect",
         "BasicGuider"}


def node(id_, type_, pos, widgets=None, links=None, title=None, size=None):
    spec = {"id": id_, "type": type_, "pos": pos, "widgets": widgets or {}, "links": links or {}}
    if title:
        spec["title"] = title
    spec["size"] = size or ((220, 60) if type_ in SMALL else (320, 160))
    return spec


def note(id_, pos, text, title="Read me", size=(420, 260)):
    return {"id": id_, "type": "MarkdownNote", "pos": pos, "text": text, "title": title, "size": size}


SOURCE = "a photo of a cat sitting on a wooden table next to a window, soft daylight"
TARGET = "a photo of a dog sitting on a wooden table next to a window, soft daylight"

_SOLVER = DEFAULTS["gnri"]  # the workflows show the core's defaults
GNRI_DEFAULTS = {"cfg": 1.0, "method": "gnri", "iterations": _SOLVER.max_iters, "tolerance": _SOLVER.tol,
                 "lam": _SOLVER.lam, "sampler": "euler", "newton_form": _SOLVER.update, "noise_seed": 0}


# Columns (x) and sizes chosen so that no nodes overlap (titles included) and every graph
# fits a 1080p window at about 90 % zoom (tests/test_browser.py checks both).
COL_A, COL_B, COL_C, COL_D, COL_E, COL_F = 0, 330, 710, 1040, 1350, 1580


def image_and_prompts(model, clip, vae, image_y=500):
    """LoadImage -> VAEEncode, source and target CLIPTextEncode (ids 10-13)."""
    return [
        node(10, "LoadImage", [COL_A, image_y], {"image": "example.png"}, title="Your photo", size=(300, 330)),
        node(11, "VAEEncode", [COL_B, 350], links={"pixels": (10, 0), "vae": vae}, size=(200, 50)),
        node(12, "CLIPTextEncode", [COL_B, 0], {"text": SOURCE}, {"clip": clip},
             title="Source prompt (describes the photo)", size=(340, 130)),
        node(13, "CLIPTextEncode", [COL_B, 180], {"text": TARGET}, {"clip": clip},
             title="Target prompt (one thing changed)", size=(340, 130)),
    ]


# at most `iterations` calls per step, then the default round-trip check (docs/guide.md): the
# floor at naive inversion, paid once per photo (a new target prompt re-runs only the edit)
REAL_TIME = {"newton_form": "secant_fixed_budget"}


def invert_and_regenerate(model, steps, scheduler, vae, **invert):
    """GNRIInvert -> SamplerCustomAdvanced(euler) -> VAEDecode -> preview (ids 20-25)."""
    return [
        node(20, "GNRIInvert", [COL_C, 0], {**GNRI_DEFAULTS, "steps": steps, "scheduler": scheduler, **invert},
             {"model": model, "positive": (12, 0), "latent": (11, 0)}, size=(300, 520)),
        node(21, "BasicGuider", [COL_D, 0], links={"model": model, "conditioning": (12, 0)}, size=(270, 50)),
        node(22, "KSamplerSelect", [COL_D, 90], {"sampler_name": "euler"}, size=(270, 60)),
        node(23, "SamplerCustomAdvanced", [COL_D, 190],
             links={"noise": (20, 1), "guider": (21, 0), "sampler": (22, 0), "sigmas": (20, 2),
                    "latent_image": (11, 0)}, title="Reconstruction (same prompt)", size=(270, 110)),
        node(24, "VAEDecode", [COL_E, 190], links={"samples": (23, 0), "vae": vae}, size=(200, 50)),
        node(25, "PreviewImage", [COL_F, 0], links={"images": (24, 0)}, title="Reconstruction", size=(300, 300)),
    ]


def edit(model, vae, edit_cfg=1.0, mask=None):
    """PromptSwapEdit -> VAEDecode -> SaveImage (ids 30-32)."""
    links = {"model": model, "inversion": (20, 3), "source": (12, 0), "target": (13, 0)}
    if mask is not None:
        links["mask"] = mask
    return [
        node(30, "GNRIPromptSwapEdit", [COL_D, 350],
             {"strength": 1.0, "edit_cfg": edit_cfg, "negative_mode": "source", "start_step": 0,
              "blend_cfg": 0.0}, links, size=(270, 260)),
        node(31, "VAEDecode", [COL_E, 350], links={"samples": (30, 0), "vae": vae}, size=(200, 50)),
        node(32, "SaveImage", [COL_F, 350], {"filename_prefix": "gnri_edit"}, {"images": (31, 0)},
             title="Edited photo", size=(300, 320)),
    ]


# Flux's joint-attention masks localise at lower thresholds than the UNet's cross-attention
# (editing benchmark, docs/editing.md: clean edits 42 % at 0.45, 54 % at 0.3, 33 % at the default 0.7)
FLUX_THRESHOLD = 0.45


def attention_mask(model, clip, **widgets):
    """AttentionMaskBlend -> mask preview (ids 40-42)."""
    return [
        node(40, "GNRIAttentionMaskBlend", [COL_C, 570],
             {"source_prompt": SOURCE, "target_prompt": TARGET, **widgets},
             {"model": model, "clip": clip, "inversion": (20, 3), "source": (12, 0), "target": (13, 0)},
             size=(300, 400)),
        node(41, "MaskToImage", [COL_D, 660], links={"mask": (40, 0)}, size=(270, 30)),
        node(42, "PreviewImage", [COL_E, 720], links={"images": (41, 0)}, title="Edit mask", size=(260, 260)),
    ]


SD15_NOTE = """## SD1.5 / SD2.1: invert, reconstruct, edit (50-step DDIM-style schedule)

1. **Load Checkpoint**: an SD1.5 or SD2.1 checkpoint (put it in `ComfyUI/models/checkpoints/`).
2. **Your photo**: load the image (512×512 works best for SD1.5).
3. **Source prompt**: describe the photo in detail. **Target prompt**: the same words, one thing changed.
4. Queue: *Reconstruction* shows the regenerated photo (should match the input), *Edited photo* the edit.

GNRI Invert uses 50 steps of `ddim_uniform` (= DDIM). Raise `iterations` for a more exact
reconstruction; `strength` on Prompt Swap Edit scales the edit (0 = reconstruction)."""

TURBO_NOTE = """## SDXL-Turbo: real-time edit (4 steps)

1. **Load Checkpoint**: `sd_xl_turbo_1.0_fp16.safetensors` in `ComfyUI/models/checkpoints/`.
2. **Your photo** at 512×512; a detailed **source prompt**; the **target** changes one word.
3. Queue. GNRI inverts 4 steps × 3 iterations; **Attention Mask Blend** finds where the
   changed words attend; **Prompt Swap Edit** regenerates with edit cfg 1.2 and keeps
   everything outside the mask exactly.

Tune: `threshold` of the mask (lower = larger area), `strength` (>1 exaggerates).
A new target prompt re-runs only the mask and the edit: GNRI Invert runs once per photo.
`newton_form` is `secant_fixed_budget` here: at most 3 calls per step; `secant` iterates
unconverged steps further (up to 8): more exact round trips, more calls. `round_trip_check`
0.05 regenerates once to check the inversion and falls back to naive inversion where that
reproduces the photo better (0: off, at most 3 calls per step, no such floor)."""

FLUX_NOTE = """## Flux.1-schnell: real-time edit (4 steps)

1. **Load Diffusion Model**: `flux1-schnell.safetensors` in `ComfyUI/models/diffusion_models/`.
2. **DualCLIPLoader**: `clip_l.safetensors` + `t5xxl_fp8_e4m3fn.safetensors` (type flux) in `models/text_encoders/`.
3. **Load VAE**: `ae.safetensors` in `models/vae/`.
4. Photo at 1024×1024 (or 512²), a detailed source prompt, a target with one change. Queue.

Flow models: regenerate with SamplerCustomAdvanced from the `noise` output (as here);
ComfyUI's native FlipSigmas inversion returns inf on Flux. A new target prompt re-runs
only the mask and the edit: GNRI Invert runs once per photo. `newton_form` is
`secant_fixed_budget` here (3 calls per step, more editable without a mask); `secant`
iterates unconverged steps further: more exact round trips. `round_trip_check` 0.05 checks
the inversion by regenerating it and falls back to naive inversion where that is better."""

CHECK_NOTE = """## Reconstruction check: GNRI vs ComfyUI's native inversion

Both invert the photo with the same prompt and 4 `sgm_uniform` steps and regenerate it:
- GNRI: GNRI Invert → SamplerCustomAdvanced euler (top row),
- native: BasicScheduler → FlipSigmas → SamplerCustom euler, twice (below it).
The previews show input | native | GNRI, and the absolute differences to the input.
Use an SDXL-Turbo (or any) checkpoint; for flow models the native path gives inf."""


def checkpoint(name, note_text):
    """The read-me note and a checkpoint loader in the first column (ids 1-2)."""
    return [note(2, [COL_A, 0], note_text, size=(300, 310)),
            node(1, "CheckpointLoaderSimple", [COL_A, 350], {"ckpt_name": name}, size=(300, 100))]


def sd15():
    model, clip, vae = (1, 0), (1, 1), (1, 2)
    return [*checkpoint("v1-5-pruned-emaonly.safetensors", SD15_NOTE),
            *image_and_prompts(model, clip, vae),
            *invert_and_regenerate(model, 50, "ddim_uniform", vae),
            *edit(model, vae)]


def turbo():
    model, clip, vae = (1, 0), (1, 1), (1, 2)
    return [*checkpoint("sd_xl_turbo_1.0_fp16.safetensors", TURBO_NOTE),
            *image_and_prompts(model, clip, vae),
            *invert_and_regenerate(model, 4, "sgm_uniform", vae, **REAL_TIME),
            *attention_mask(model, clip),
            *edit(model, vae, edit_cfg=1.2, mask=(40, 0))]


def flux():
    model, clip, vae = (1, 0), (3, 0), (4, 0)
    return [note(2, [COL_A, 0], FLUX_NOTE, size=(300, 250)),
            node(1, "UNETLoader", [COL_A, 290], {"unet_name": "flux1-schnell.safetensors", "weight_dtype": "default"},
                 size=(300, 82)),
            node(3, "DualCLIPLoader", [COL_A, 410], {"clip_name1": "clip_l.safetensors",
                                                     "clip_name2": "t5xxl_fp8_e4m3fn.safetensors", "type": "flux"},
                 size=(300, 130)),
            node(4, "VAELoader", [COL_A, 580], {"vae_name": "ae.safetensors"}, size=(300, 58)),
            *image_and_prompts(model, clip, vae, image_y=680),
            *invert_and_regenerate(model, 4, "simple", vae, **REAL_TIME),
            *attention_mask(model, clip, threshold=FLUX_THRESHOLD),
            *edit(model, vae, mask=(40, 0))]


def reconstruction_check():
    model, clip, vae = (1, 0), (1, 1), (1, 2)
    nodes = [*checkpoint("sd_xl_turbo_1.0_fp16.safetensors", CHECK_NOTE),
             *image_and_prompts(model, clip, vae)[:3],
             *invert_and_regenerate(model, 4, "sgm_uniform", vae)[:5]]
    custom = {"add_noise": False, "noise_seed": 0, "cfg": 1.0}
    col_g = COL_F + 250
    nodes += [
        node(50, "BasicScheduler", [COL_C, 570], {"scheduler": "sgm_uniform", "steps": 4, "denoise": 1.0},
             {"model": model}, size=(300, 110)),
        node(51, "FlipSigmas", [COL_C, 720], links={"sigmas": (50, 0)}, size=(300, 30)),
        node(52, "SamplerCustom", [COL_D, 350], custom,
             {"model": model, "positive": (12, 0), "negative": (12, 0), "sampler": (22, 0),
              "sigmas": (51, 0), "latent_image": (11, 0)}, title="Native inversion (FlipSigmas)", size=(270, 230)),
        node(53, "SamplerCustom", [COL_D, 620], custom,
             {"model": model, "positive": (12, 0), "negative": (12, 0), "sampler": (22, 0),
              "sigmas": (50, 0), "latent_image": (52, 0)}, title="Native reconstruction", size=(270, 230)),
        node(54, "VAEDecode", [COL_E, 640], links={"samples": (53, 0), "vae": vae}, size=(200, 50)),
        node(60, "ImageBatch", [COL_F, 190], links={"image1": (10, 0), "image2": (54, 0)}, size=(200, 50)),
        node(61, "ImageBatch", [COL_F, 280], links={"image1": (60, 0), "image2": (24, 0)}, size=(200, 50)),
        node(62, "PreviewImage", [col_g, 0], links={"images": (61, 0)}, title="input | native | GNRI",
             size=(320, 400)),
        node(63, "ImageBlend", [COL_E, 350], {"blend_factor": 1.0, "blend_mode": "difference"},
             {"image1": (10, 0), "image2": (54, 0)}, title="|input - native|", size=(200, 102)),
        node(64, "ImageBlend", [COL_E, 490], {"blend_factor": 1.0, "blend_mode": "difference"},
             {"image1": (10, 0), "image2": (24, 0)}, title="|input - GNRI|", size=(200, 102)),
        node(65, "ImageBatch", [COL_F, 490], links={"image1": (63, 0), "image2": (64, 0)}, size=(200, 50)),
        node(66, "PreviewImage", [col_g, 450], links={"images": (65, 0)}, title="differences: native | GNRI",
             size=(320, 400)),
    ]
    return nodes


WORKFLOWS = {
    "GNRI - SD1.5 invert, reconstruct, edit.json": (sd15(), {"gnri_test_family": "eps"}),
    "GNRI - SDXL-Turbo real-time edit.json": (turbo(), {"gnri_test_family": "eps"}),
    "GNRI - Flux.1-schnell real-time edit.json": (flux(), {"gnri_test_family": "flow"}),
    "GNRI - Reconstruction check.json": (reconstruction_check(), {"gnri_test_family": "eps"}),
}


INTERPOLATE_NOTE = """## Interpolate between two photos (GNRI Interpolate)

1. **Load Checkpoint**: an SD1.5 checkpoint; two photos of the same size, each with a prompt that describes it.
2. Both are inverted with the same settings (GNRI Invert); **GNRI Interpolate** regenerates `frames`
   images from the spherical interpolation of the two inverted noises (it keeps them Gaussian) and the
   linear interpolation of the prompts.
3. Queue: the first and last frames are the two reconstructions, the frames between morph one into the other.

Exact inversion is what makes the ends match and keeps the middle frames sharp (naive `ddim`
inversion gives off-distribution noises)."""

CONCEPT_NOTE = """## A rare concept from a few examples (GNRI Concept Noise)

1. **Load Checkpoint**: an SD1.5 checkpoint; a few photos of a concept the model rarely draws
   (batched with Image Batch), and a prompt that names it.
2. GNRI Invert inverts them all; **GNRI Concept Noise** draws seeds near their inverted noises:
   `spread` is the angle from their centroid in units of 90° (0: the centroid, 1: random noise).
3. Queue: SamplerCustomAdvanced draws `batch_size` new images of the concept from those seeds.

Regenerate with `euler` and the inversion's `sigmas` output, as here."""


def interpolate():
    model, clip, vae = (1, 0), (1, 1), (1, 2)
    a_prompt = "a photo of a cat sitting on a wooden table, soft daylight"
    b_prompt = "a photo of a dog sitting on a wooden table, soft daylight"
    invert = {**GNRI_DEFAULTS, "steps": 25, "scheduler": "ddim_uniform"}
    return [note(2, [COL_A, 0], INTERPOLATE_NOTE, size=(300, 250)),
            node(1, "CheckpointLoaderSimple", [COL_A, 290], {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
                 size=(300, 100)),
            node(10, "LoadImage", [COL_A, 430], {"image": "example.png"}, title="First photo", size=(300, 300)),
            node(12, "CLIPTextEncode", [COL_B, 0], {"text": a_prompt}, {"clip": clip},
                 title="First prompt (describes the first photo)", size=(340, 130)),
            node(16, "CLIPTextEncode", [COL_B, 180], {"text": b_prompt}, {"clip": clip},
                 title="Second prompt (describes the second photo)", size=(340, 130)),
            node(11, "VAEEncode", [COL_B, 350], links={"pixels": (10, 0), "vae": vae}, size=(200, 50)),
            node(15, "VAEEncode", [COL_B, 430], links={"pixels": (14, 0), "vae": vae}, size=(200, 50)),
            node(14, "LoadImage", [COL_B, 520], {"image": "example.png"}, title="Second photo", size=(300, 300)),
            node(20, "GNRIInvert", [COL_C, 0], invert, {"model": model, "positive": (12, 0), "latent": (11, 0)},
                 title="GNRI Invert (first photo)", size=(300, 520)),
            node(21, "GNRIInvert", [COL_D, 0], invert, {"model": model, "positive": (16, 0), "latent": (15, 0)},
                 title="GNRI Invert (second photo)", size=(300, 520)),
            node(30, "GNRIInterpolate", [COL_C, 580], {"frames": 5},
                 {"model": model, "inversion_a": (20, 3), "inversion_b": (21, 3), "positive_a": (12, 0),
                  "positive_b": (16, 0)}, size=(300, 200)),
            node(31, "VAEDecode", [COL_D, 580], links={"samples": (30, 0), "vae": vae}, size=(200, 50)),
            node(32, "SaveImage", [COL_E, 0], {"filename_prefix": "gnri_interpolation"}, {"images": (31, 0)},
                 title="Frames", size=(400, 400))]


def concept():
    model, clip, vae = (1, 0), (1, 1), (1, 2)
    prompt = "a photo of a blue strawberry on a white plate"
    return [note(2, [COL_A, 0], CONCEPT_NOTE, size=(300, 250)),
            node(1, "CheckpointLoaderSimple", [COL_A, 290], {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
                 size=(300, 100)),
            node(10, "LoadImage", [COL_A, 430], {"image": "example.png"}, title="Example 1", size=(300, 300)),
            node(14, "CLIPTextEncode", [COL_B, 0], {"text": prompt}, {"clip": clip},
                 title="The concept's prompt", size=(340, 130)),
            node(11, "LoadImage", [COL_B, 180], {"image": "example.png"}, title="Example 2", size=(300, 300)),
            node(12, "ImageBatch", [COL_B, 520], links={"image1": (10, 0), "image2": (11, 0)}, size=(220, 60)),
            node(13, "VAEEncode", [COL_B, 620], links={"pixels": (12, 0), "vae": vae}, size=(200, 50)),
            node(20, "GNRIInvert", [COL_C, 0], {**GNRI_DEFAULTS, "steps": 25, "scheduler": "ddim_uniform"},
                 {"model": model, "positive": (14, 0), "latent": (13, 0)}, size=(300, 520)),
            node(30, "GNRIConceptNoise", [COL_D, 0], {"spread": 0.5, "noise_seed": 0, "batch_size": 2},
                 {"model": model, "inversion": (20, 3)}, size=(270, 180)),
            node(31, "BasicGuider", [COL_D, 230], links={"model": model, "conditioning": (14, 0)}, size=(270, 50)),
            node(32, "KSamplerSelect", [COL_D, 320], {"sampler_name": "euler"}, size=(270, 60)),
            node(33, "SamplerCustomAdvanced", [COL_D, 430],
                 links={"noise": (30, 0), "guider": (31, 0), "sampler": (32, 0), "sigmas": (20, 2),
                        "latent_image": (30, 1)}, title="New samples of the concept", size=(270, 110)),
            node(34, "VAEDecode", [COL_E, 430], links={"samples": (33, 0), "vae": vae}, size=(200, 50)),
            node(35, "SaveImage", [COL_F, 0], {"filename_prefix": "gnri_concept"}, {"images": (34, 0)},
                 title="Samples", size=(300, 300))]


WORKFLOWS.update({
    "GNRI - SD1.5 interpolate two photos.json": (interpolate(), {"gnri_test_family": "eps"}),
    "GNRI - SD1.5 concept from examples.json": (concept(), {"gnri_test_family": "eps"}),
})
