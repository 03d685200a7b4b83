"""The world's models, built from ComfyUI's own classes, and their shipped weights.

* ``unet``: ``comfy.model_base.BaseModel`` (SD15 config: EPS, ModelSamplingDiscrete,
  SD15 latent format) around ComfyUI's ``UNetModel`` with cross-attention (attn2).
* ``flux``: ``comfy.model_base.Flux`` (FluxSchnell config: FLOW/CONST, shift 1) around
  ComfyUI's Flux DiT with double (joint-attention) and single blocks.
* text encoder: a real ``comfy.sd.CLIP`` (``SD1ClipModel`` + the real CLIP tokenizer)
  made small through ComfyUI's ``clip_l_model_config`` option (width 64, 2 layers, full
  49408-token table), frozen at its random initialisation and SHIPPED as a file.  Both
  models read its per-token output (77 x 64) as context; Flux also reads its pooled
  vector (64) as ``y``.

Weights live in ``gnri_world/weights/`` as fp16 safetensors (configs in the metadata).
Needs ComfyUI importable (inside ComfyUI, or after ``ensure_comfy()``).
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

# GNRI_WORLD_WEIGHTS: another folder of the same files (e.g. a training run's export)
WEIGHTS_DIR = os.environ.get("GNRI_WORLD_WEIGHTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
FAMILIES = ("unet", "flux")
TEXT_WIDTH = 64
TEXT_CONFIG = {"hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
               "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": TEXT_WIDTH}
UNET_CONFIG = dict(
    model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 1],
    transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1, context_dim=TEXT_WIDTH,
    num_heads=-1, num_head_channels=32, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=True, in_channels=4, out_channels=4, adm_in_channels=None,
    image_size=16, use_checkpoint=False, use_temporal_attention=False,
)
FLUX_CONFIG = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH,
    hidden_size=96, mlp_ratio=2.0, num_heads=3, depth=2, depth_single_blocks=1,
    axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
)
CONFIGS = {"unet": UNET_CONFIG, "flux": FLUX_CONFIG}
FILES = {"unet": "world_unet.safetensors", "flux": "world_flux.safetensors", "text": "world_text.safetensors"}


def ensure_comfy(cpu: bool | None = None) -> None:
    """Make ComfyUI importable outside a running ComfyUI (scripts, training):
    ``GNRI_COMFYUI_PATH`` (default ``<repo>/.comfyui``) goes first on ``sys.path``
    and ComfyUI parses ``--cpu`` (when no CUDA, or ``cpu``) instead of our argv."""
    if "comfy.cli_args" in sys.modules:
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(os.environ.get("GNRI_COMFYUI_PATH") or os.path.join(repo, ".comfyui"))
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"No ComfyUI at {path!r}: set GNRI_COMFYUI_PATH")
    sys.path.insert(0, path)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    argv, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if cpu else [])
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the argv set above)
    sys.argv = argv


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int, zero: tuple[str, ...] = ()) -> torch.nn.Module:
    """Seeded init (ComfyUI's layers skip their own): weights N(0, 1/fan_in), embeddings
    N(0, 1), biases 0, norms 1/0; parameters whose name ends with one of ``zero``: 0."""
    gen = torch.Generator().manual_seed(int(seed))
    for mod_name, mod in module.named_modules():
        kind = type(mod).__name__
        for name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            if any(full.endswith(z) for z in zero) or name == "bias" or name.endswith("_bias"):
                val = torch.zeros(p.shape)
            elif "Norm" in kind or name == "scale":
                val = torch.ones(p.shape)
            elif "Embedding" in kind or p.ndim < 2:
                val = torch.randn(p.shape, generator=gen)
            else:
                val = torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel()))
            p.copy_(val.to(p.dtype))
    return module


def build(family: str, device=None, dtype=torch.float32):
    """An untrained (uninitialised) ``BaseModel`` of ``family``."""
    import comfy.model_base
    import comfy.supported_models
    if family not in CONFIGS:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    cls = comfy.supported_models.SD15 if family == "unet" else comfy.supported_models.FluxSchnell
    cfg = cls(dict(CONFIGS[family], dtype=dtype))
    cfg.set_inference_dtype(dtype, None)
    return cfg.get_model({}, device=device)


ZERO_INIT = {"unet": ("out.2.weight", "proj_out.weight", "emb_layers.1.weight"),
             "flux": ("final_layer.linear.weight",)}


def fresh(family: str, seed: int, device=None):
    return init_weights(build(family, device), seed, ZERO_INIT[family])


def text_encoder(seed: int | None = None, dtype=torch.float32):
    """The world's ``comfy.sd.CLIP``: shipped weights, or fresh ones from ``seed``."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params: dict = {}

    opts = {"dtype": dtype, "clip_l_model_config": dict(TEXT_CONFIG)}
    clip = comfy.sd.CLIP(Target(), embedding_directory=None, model_options=opts)
    if seed is not None:
        init_weights(clip.cond_stage_model, seed)
    else:
        clip.cond_stage_model.load_state_dict(_read(FILES["text"]), strict=True)
        clip.cond_stage_model.requires_grad_(False)
    return clip


def save_text_encoder(seed: int = 0) -> str:
    """Create the frozen random text encoder once and ship it (``FILES["text"]``)."""
    return save(text_encoder(seed).cond_stage_model.state_dict(), FILES["text"])


def encode_text(clip, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (context [B, 77, 64], pooled [B, 64]), as CLIPTextEncode computes them."""
    ctx, pooled = [], []
    for c in captions:
        cond, pool = clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)
        ctx.append(cond[0])
        pooled.append(pool[0])
    return torch.stack(ctx).float(), torch.stack(pooled).float()


def _read(name: str, directory: str | None = None) -> dict:
    return read_file(name, directory)[0]


def read_file(name: str, directory: str | None = None) -> tuple[dict, dict]:
    """A weight file's state dict (fp32) and its metadata (config, steps, minutes), in one read."""
    from safetensors import safe_open
    path = os.path.join(directory or WEIGHTS_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"world weights not found: {path}")
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys()}
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return state, meta


def save(state: dict, name: str, directory: str | None = None, meta: dict | None = None) -> str:
    from safetensors.torch import save_file
    directory = directory or WEIGHTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    save_file({k: v.detach().half().contiguous().cpu() for k, v in state.items()}, path,
              metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
    return path


def load(family: str, directory: str | None = None):
    """The shipped model of ``family`` as a ComfyUI ``ModelPatcher`` (fp32)."""
    import comfy.model_management
    import comfy.model_patcher
    model = build(family)
    model.diffusion_model.load_state_dict(_read(FILES[family], directory), strict=True)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model.eval(), load_device=dev, offload_device=torch.device("cpu"))
