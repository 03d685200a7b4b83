"""Tiny, randomly initialised diffusion models and text encoder built from ComfyUI's
own classes (``comfy.supported_models``, ``comfy.model_base``, ``comfy.sd.CLIP``),
for tests on CPU.

ComfyUI builds its layers with ``comfy.ops.disable_weight_init`` (weights are left
uninitialised: garbage / NaN), so every builder here initialises every parameter
explicitly from a seeded ``torch.Generator``: weights ~ N(0, std^2) with the LeCun
std 1/sqrt(fan_in) clamped to [0.02, 0.2] (0.02-0.2 here; see ``init_params``),
biases 0, norm scales 1.  Same seed -> bit-identical weights.  With these, the
denoisers' outputs are O(1) and finite in fp32/fp16/bf16, stock euler sampling ends
at model-space std ~0.8-1.5, and the prompt changes a partial (denoise 0.6)
sample by ~10% (eps/v, cfg 1) to ~70% (flow).

Families: ``"eps"`` (SD1.5 UNet), ``"v"`` (same UNet, V_PREDICTION),
``"flow"`` (Flux-schnell DiT, CONST / flow matching).

Latents from ``random_latent`` are "raw" latents, i.e. what ``VAEEncode`` would
return; ComfyUI's sampling applies ``model.process_latent_in`` (SD1.5:
x*0.18215; Flux: (x-0.1159)*0.3611) before the model sees them, and the model-space
values are ~N(0, 1).

Standalone, this module imports ``comfy_env`` first (sets ComfyUI up); inside a
running ComfyUI (tests/testing_pack in the server) it does not.
"""
from __future__ import annotations

import math

import sys

if "comfy.cli_args" not in sys.modules:  # standalone use: set ComfyUI up first
    from . import comfy_env  # noqa: F401  (never re-run inside a running ComfyUI)

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

FAMILIES = ("eps", "v", "flow")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

UNET_CONFIG = dict(
    model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=2, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=False, in_channels=4, out_channels=4, adm_in_channels=None,
    image_size=32, use_checkpoint=False, use_temporal_attention=False,
)

FLUX_CONFIG = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
    hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
    axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
)
FLUX_CONTEXT_DIM = 32  # T5 stand-in width  (conditioning tensor's last dim)
FLUX_POOLED_DIM = 32   # CLIP-pooled stand-in width
LATENT_CHANNELS = {"eps": 4, "v": 4, "flow": 16}


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return DTYPES[dtype]
    return dtype


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(module).__name__


@torch.no_grad()
def init_params(module: torch.nn.Module, seed: int, gain: float = 1.0, min_std: float = 0.02,
                max_std: float = 0.2, std_overrides: dict | None = None) -> torch.nn.Module:
    """Deterministically initialise every floating parameter of ``module``.

    Norm layers: scale 1, bias 0.  Other biases: 0.  Weights (>= 2-D, fan_in =
    elements per output row): N(0, std^2) with std = clamp(gain / sqrt(fan_in),
    min_std, max_std), or ``std_overrides[param_name]``.  Other 1-D / scalar
    parameters: N(0, min_std^2) (``scale`` ones: 1).  Values are drawn in float32 in
    ``named_modules`` order and then cast, so the dtype does not change the draw.
    """
    std_overrides = std_overrides or {}
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for mod_name, mod in module.named_modules():
        norm = _is_norm(mod)
        for name, p in mod.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            if norm or (name == "scale" and p.ndim <= 1):
                val = torch.ones(p.shape) if name in ("weight", "scale") else torch.zeros(p.shape)
            elif name == "bias" or name.endswith("_bias"):
                val = torch.zeros(p.shape)
            elif p.ndim >= 2:
                fan_in = max(1, p[0].numel())
                std = std_overrides.get(full, min(max(gain / math.sqrt(fan_in), min_std), max_std))
                val = torch.randn(p.shape, generator=gen) * std
            else:
                val = torch.randn(p.shape, generator=gen) * min_std
            p.copy_(val.to(p.dtype))
    return module


class TinySkipUNet(UNetModel):
    """ComfyUI's ``UNetModel`` plus ``skip * input`` on its output.

    A random UNet predicts noise uncorrelated with its input, so EPS sampling from
    sigma_max ~ 14.6 would never remove the noise (final latents ~ +-100).  With
    the skip, eps(x) ~ x / sqrt(1 + sigma^2) (a fair guess of the noise at high
    sigma) plus a small random, nonlinear, conditioning-dependent part; everything
    else (blocks, transformer_options, attention patches, wrappers) is the stock
    UNet's.
    """
    skip = 1.0

    def forward(self, x, *args, **kwargs):
        out = super().forward(x, *args, **kwargs)
        return out + self.skip * x[:, : out.shape[1]].to(out.dtype) if self.skip else out


def _patcher(model: torch.nn.Module):
    dev = comfy.model_management.get_torch_device()  # cpu under --cpu
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def _config(config_cls, unet_config: dict, dtype: torch.dtype):
    cfg = config_cls(dict(unet_config, dtype=dtype))
    cfg.set_inference_dtype(dtype, None)
    return cfg


def _tiny_unet(model_type, skip: float, dtype, seed: int):
    dtype = _dtype(dtype)
    cfg = _config(comfy.supported_models.SD15, UNET_CONFIG, dtype)
    model = comfy.model_base.BaseModel(cfg, model_type=model_type, device=torch.device("cpu"),
                                       unet_model=TinySkipUNet)
    model.diffusion_model.skip = skip
    # The UNet's last conv is zero-initialised in real (untrained) SD UNets; keep
    # its random part smallish so the skip dominates (eps) / v stays O(1).
    init_params(model, seed, std_overrides={"diffusion_model.out.2.weight": 0.05})
    return _patcher(model.eval())


def tiny_eps_model(dtype=torch.float32, seed: int = 0):
    """SD1.5-class UNet (ModelType.EPS, ModelSamplingDiscrete, SD15 latent format),
    ~1.6 M params, context_dim 768 (fits ``tiny_clip``)."""
    return _tiny_unet(comfy.model_base.ModelType.EPS, 1.0, dtype, seed)


def tiny_v_model(dtype=torch.float32, seed: int = 0):
    """The same tiny SD1.5 UNet with ModelType.V_PREDICTION (as SD2.x-768 v models)."""
    return _tiny_unet(comfy.model_base.ModelType.V_PREDICTION, 0.0, dtype, seed)


def tiny_flux_model(dtype=torch.float32, seed: int = 0):
    """Flux-schnell-class DiT (``model_base.Flux``, ModelType.FLOW -> CONST +
    ModelSamplingDiscreteFlow, shift 1, sigma_max 1), hidden 64, 1 double + 1 single
    block, 16 latent channels, context/pooled width 32 (see ``flux_conditioning``)."""
    dtype = _dtype(dtype)
    cfg = _config(comfy.supported_models.FluxSchnell, FLUX_CONFIG, dtype)
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_params(model, seed)
    return _patcher(model.eval())


def tiny_model(family: str, dtype=torch.float32, seed: int = 0):
    """``family`` in ``FAMILIES``; ``dtype`` a torch dtype or "fp32"/"fp16"/"bf16"."""
    return {"eps": tiny_eps_model, "v": tiny_v_model, "flow": tiny_flux_model}[family](dtype=dtype, seed=seed)


class _SD1Target:
    clip = comfy.sd1_clip.SD1ClipModel
    tokenizer = comfy.sd1_clip.SD1Tokenizer
    params: dict = {}


def tiny_clip(seed: int = 0, layers: int = 2, dtype=torch.float32):
    """A real ``comfy.sd.CLIP``: ``SD1ClipModel`` (CLIP-L text transformer, 768 wide,
    so its output fits the tiny UNet) + the real ``SD1Tokenizer``, with ``layers``
    transformer layers instead of 12 (set through ComfyUI's own
    ``clip_l_model_config`` model option) and random weights from ``seed``.
    ``clip.tokenize(text)`` / ``clip.encode_from_tokens(tokens, return_pooled=True)``
    and the stock CLIPTextEncode node work; outputs are (B, 77, 768), ~unit scale."""
    model_options = {"dtype": _dtype(dtype),
                     "clip_l_model_config": {"num_hidden_layers": int(layers)}}
    clip = comfy.sd.CLIP(_SD1Target(), embedding_directory=None, model_options=model_options)
    init_params(clip.cond_stage_model, seed)
    return clip


def flux_conditioning(batch: int = 1, seed: int = 0, length: int = 8):
    """Stand-in for a Flux text encoding: ``[[cond (B, L, 32), {"pooled_output": (B, 32)}]]``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    cond = torch.randn(batch, length, FLUX_CONTEXT_DIM, generator=gen)
    pooled = torch.randn(batch, FLUX_POOLED_DIM, generator=gen)
    return [[cond, {"pooled_output": pooled}]]


def latent_format(family: str):
    return comfy.latent_formats.Flux() if family == "flow" else comfy.latent_formats.SD15()


def random_latent(family: str, batch: int = 1, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    """A raw (VAE-space) latent (B, C, h, w), C = 4 (eps/v) or 16 (flow); h, w are
    LATENT sizes (pixels / 8).  Model-space (``latent_format.process_in``) values
    are ~N(0, 1), like an encoded image; raw std is ~5.5 (SD1.5) / ~2.8 (Flux)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(batch, LATENT_CHANNELS[family], h, w, generator=gen)
    return latent_format(family).process_out(z)


def sample(model, latent: torch.Tensor, positive, negative=None, steps: int = 6, cfg: float = 1.0,
           sampler_name: str = "euler", scheduler: str = "normal", seed: int = 0,
           denoise: float = 1.0) -> torch.Tensor:
    """Stock ``comfy.sample.sample`` (what KSampler runs) on a raw latent -> raw latent."""
    if negative is None:
        negative = positive
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent, denoise=denoise, disable_pbar=True, seed=seed)
