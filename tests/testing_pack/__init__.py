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

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # through the symlink


def _load_tiny_models():
    # tests/tiny_models.py, without putting tests/ on sys.path (that would expose
    # tests/comfy_env.py, which must never run inside a running ComfyUI).
    path = os.path.join(_TESTS_DIR, "tiny_models.py")
    mod = sys.modules.get("tiny_models")
    if mod is not None and os.path.realpath(getattr(mod, "__file__", "")) == os.path.realpath(path):
        return mod
    name = "gnri_testing_pack_tiny_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


tiny_models = _load_tiny_models()

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


NODE_CLASS_MAPPINGS = {
    "GNRITestDecode": GNRITestDecode,
    "GNRITestTinyModel": GNRITestTinyModel,
    "GNRITestConditioning": GNRITestConditioning,
    "GNRITestLatent": GNRITestLatent,
    "GNRITestLatentStats": GNRITestLatentStats,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k.replace("GNRITest", "GNRI Test ") for k in NODE_CLASS_MAPPINGS}
