"""Test-only ComfyUI node pack (V1 ``NODE_CLASS_MAPPINGS``): tiny in-memory models,
conditioning and latents, and a latent-comparison output node, so whole workflows
run in seconds on CPU, both in-process (tests/conftest.py ``executor``) and in a
real ComfyUI server (``comfy_server``; this folder is symlinked into its
custom_nodes).  Never shipped: it lives under tests/.

Models are built inside the executing prompt (so, like those from ComfyUI's real
loaders, their weights are inference tensors) and cached per (family, dtype, seed)
for the life of the process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # through the symlink


def _load_repo_package(name: str):
    """A top-level package of the repo (``gnri_testing``, ``gnri_world``), the copy
    already imported if there is one (the in-process executor), else imported by
    path: the repo root must not go on sys.path inside ComfyUI, its ``nodes/`` would
    shadow ComfyUI's."""
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.join(_REPO_ROOT, name)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# gnri_testing's __init__ imports nothing, and tiny_models skips comfy_env (which must
# never run inside a running ComfyUI) when ComfyUI is already set up.
_load_repo_package("gnri_testing")
from gnri_testing import tiny_models  # noqa: E402

FAMILIES = list(tiny_models.FAMILIES)          # ["eps", "v", "flow"]
DTYPES = list(tiny_models.DTYPES)              # ["fp32", "fp16", "bf16"]
CATEGORY = "GNRI/testing"

_MODELS: dict = {}   # (family, dtype, seed) -> ModelPatcher
_CLIPS: dict = {}    # seed -> comfy.sd.CLIP
LAST_STATS: dict = {}  # node unique_id -> stats dict of the last GNRITestLatentStats run


def get_tiny_model(family: str, dtype: str = "fp32", seed: int = 0):
    key = (family, dtype, int(seed))
    if key not in _MODELS:
        _MODELS[key] = tiny_models.tiny_model(family, dtype=dtype, seed=int(seed))
    return _MODELS[key]


def get_tiny_clip(seed: int = 0):
    if seed not in _CLIPS:
        _CLIPS[seed] = tiny_models.tiny_clip(seed=int(seed))
    return _CLIPS[seed]


class GNRITestTinyModel:
    """Tiny random model of a family (eps: SD1.5 UNet, v: same UNet with
    V_PREDICTION, flow: Flux-schnell DiT) and the tiny SD1 CLIP (768 wide: fits
    eps/v; for flow use GNRITestConditioning)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES, {"default": "eps"}),
            "dtype": (DTYPES, {"default": "fp32"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, family, dtype, seed=0):
        return (get_tiny_model(family, dtype, seed), get_tiny_clip(0))


class GNRITestConditioning:
    """Random CONDITIONING shaped like the family's text encoder output: flow:
    (B, length, 32) + pooled (B, 32); eps/v: (B, length, 768) + pooled (B, 768)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES, {"default": "flow"}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "length": ("INT", {"default": 8, "min": 1, "max": 512}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, family, batch, seed, length=8):
        if family == "flow":
            return (tiny_models.flux_conditioning(batch, seed, length),)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        cond = torch.randn(batch, length, 768, generator=gen)
        pooled = torch.randn(batch, 768, generator=gen)
        return ([[cond, {"pooled_output": pooled}]],)


class GNRITestLatent:
    """A random raw LATENT standing in for a VAE-encoded image (width/height in
    pixels, latent = /8; 4 channels for eps/v, 16 for flow)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES, {"default": "eps"}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
            "width": ("INT", {"default": 128, "min": 16, "max": 4096, "step": 16}),
            "height": ("INT", {"default": 128, "min": 16, "max": 4096, "step": 16}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, family, batch, width, height, seed):
        samples = tiny_models.random_latent(family, batch, height // 8, width // 8, seed)
        return ({"samples": samples},)


def latent_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a-b|, RMS(a-b), RMS(a) and RMS(a-b)/RMS(a), in float64, on raw latents."""
    if a.shape != b.shape:
        raise ValueError(f"GNRITestLatentStats: latent shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    d = a64 - b64
    rms_a = a64.pow(2).mean().sqrt().item()
    rms = d.pow(2).mean().sqrt().item()
    return {
        "max_abs": d.abs().max().item(),
        "rms": rms,
        "rms_a": rms_a,
        "rel_rms": rms / rms_a if rms_a > 0 else float("inf"),
        "finite": bool(torch.isfinite(b64).all().item() and torch.isfinite(a64).all().item()),
        "shape": list(a.shape),
    }


class GNRITestLatentStats:
    """Output node: compares two LATENTs (a = reference).  UI output
    ``{"gnri_stats": [stats], "text": [json]}`` (see ``latent_stats``), so HTTP tests
    read it from /history/<id> -> outputs -> <node id>; also kept in ``LAST_STATS``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent_a": ("LATENT",), "latent_b": ("LATENT",)},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "compare"
    CATEGORY = CATEGORY

    def compare(self, latent_a, latent_b, unique_id=None):
        stats = latent_stats(latent_a["samples"], latent_b["samples"])
        LAST_STATS[str(unique_id)] = stats
        return {"ui": {"gnri_stats": [stats], "text": [json.dumps(stats)]}}


class GNRITestDecode:
    """Stand-in for VAEDecode: LATENT -> IMAGE (B, 8h, 8w, 3) from the first three
    channels (sigmoid, nearest upsampling), so image nodes downstream can run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples):
        x = samples["samples"][:, :3].float()
        x = torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")
        return (torch.sigmoid(x).permute(0, 2, 3, 1).contiguous(),)


# ---------------------------------------------------------------- the trained world

WORLD_PX = 8   # IMAGE pixels per world pixel (= latent cell), ComfyUI's VAE convention


_load_repo_package("gnri_world")
from gnri_world import latent as world_latent, models as world_models, scenes as world_scenes, scorer as world_scorer  # noqa: E402

WORLD_FAMILIES = list(world_models.FAMILIES)
_WORLD: dict = {}   # family / "text" -> ModelPatcher / CLIP


def world_model(family: str):
    if family not in _WORLD:
        _WORLD[family] = world_models.load(family)
    return _WORLD[family]


def world_clip():
    if "text" not in _WORLD:
        _WORLD["text"] = world_models.text_encoder()
    return _WORLD["text"]


def to_world(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, 8h, 8w, 3] -> world pixels [B, h, w, 3] (mean of each 8x8 block)."""
    if image.shape[1] % WORLD_PX or image.shape[2] % WORLD_PX:
        raise ValueError(f"image: height and width must be multiples of {WORLD_PX}, got {tuple(image.shape[1:3])}")
    x = torch.nn.functional.avg_pool2d(image[..., :3].permute(0, 3, 1, 2).float(), WORLD_PX)
    return x.permute(0, 2, 3, 1).contiguous()


def from_world(pixels: torch.Tensor) -> torch.Tensor:
    """World pixels [B, h, w, C] -> IMAGE [B, 8h, 8w, C] (nearest)."""
    return pixels.repeat_interleave(WORLD_PX, 1).repeat_interleave(WORLD_PX, 2).contiguous()


class GNRIWorldLoader:
    """The pack's trained world models (gnri_world/weights): ``unet`` (SD1.5-type EPS UNet)
    or ``flux`` (Flux-type flow DiT), and the shipped world text encoder as a real CLIP
    (stock CLIPTextEncode works; its output fits both models)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (WORLD_FAMILIES, {"default": "unet"})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, family):
        return (world_model(family), world_clip())


class GNRIWorldEncode:
    """IMAGE -> LATENT with the world's exact linear "VAE" (8x8 pixel blocks averaged
    into one latent cell, as a VAE downscales)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "family": (WORLD_FAMILIES, {"default": "unet"})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels, family):
        return ({"samples": world_latent.encode(to_world(pixels), family)},)


class GNRIWorldDecode:
    """LATENT -> IMAGE with the world's exact linear "VAE" (each latent cell an 8x8 block)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "family": (WORLD_FAMILIES, {"default": "unet"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, family):
        return (from_world(world_latent.decode(samples["samples"].float().cpu(), family)),)


class GNRIWorldScene:
    """A world scene as IMAGE (16x16 world pixels, 8 px each) + the objects' MASK +
    its caption: a random scene from ``seed``, or the one ``caption`` names (size and
    position from ``seed``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "caption": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("image", "mask", "caption")
    FUNCTION = "render"
    CATEGORY = CATEGORY

    def render(self, seed, caption=""):
        scene = world_scenes.sample_scenes(1, seed)[0]
        if caption.strip():
            scene = world_scenes.from_caption(caption, seed)
        img, masks = world_scenes.render(scene)
        return (from_world(img[None]), from_world(masks.sum(0)[None, ..., None])[..., 0], scene.caption())


class GNRIWorldScore:
    """Output node: reads each IMAGE of a batch back with the world's scorer against
    ``caption``; with ``reference`` (and ``mask``: the edit region, any size), also the
    PSNR to the reference outside the mask.  UI: ``{"gnri_world": [{"correct": [..],
    "read": [..], "psnr_outside": [..]}], "text": [json]}`` (lists over the batch)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "caption": ("STRING", {"default": ""})},
                "optional": {"reference": ("IMAGE",), "mask": ("MASK",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "score"
    CATEGORY = CATEGORY

    def score(self, image, caption, reference=None, mask=None):
        scene = world_scenes.from_caption(caption)
        pixels = to_world(image)
        result = {"correct": [world_scorer.score(p, scene) for p in pixels],
                  "read": [[r.__dict__ for r in world_scorer.read(p, len(scene.objects))] for p in pixels]}
        if reference is not None:
            ref = to_world(reference)
            outside = torch.ones(pixels.shape[1:3])
            if mask is not None:
                m = (mask if mask.ndim == 3 else mask[None])[:1, None].float()
                outside = (torch.nn.functional.interpolate(m, size=pixels.shape[1:3], mode="area")[0, 0] < 0.5).float()
            result["psnr_outside"] = [world_scorer.psnr(p, ref[min(i, len(ref) - 1)], outside)
                                      for i, p in enumerate(pixels)]
        return {"ui": {"gnri_world": [result], "text": [json.dumps(result)]}}


NODE_CLASS_MAPPINGS = {
    "GNRIWorldLoader": GNRIWorldLoader,
    "GNRIWorldEncode": GNRIWorldEncode,
    "GNRIWorldDecode": GNRIWorldDecode,
    "GNRIWorldScene": GNRIWorldScene,
    "GNRIWorldScore": GNRIWorldScore,
    "GNRITestDecode": GNRITestDecode,
    "GNRITestTinyModel": GNRITestTinyModel,
    "GNRITestConditioning": GNRITestConditioning,
    "GNRITestLatent": GNRITestLatent,
    "GNRITestLatentStats": GNRITestLatentStats,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k.replace("GNRITest", "GNRI Test ").replace("GNRIWorld", "GNRI World ")
                              for k in NODE_CLASS_MAPPINGS}
