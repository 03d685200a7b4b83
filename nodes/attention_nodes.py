"""Attention Mask Blend: where to edit, from the model's own attention to the changed words.

The glue only: tokenising with the CLIP given, attention patches on a CLONED model, one
model evaluation at a latent of the inversion trajectory through ComfyUI's sampling
(``comfy.sample.sample_custom`` with a KSAMPLER that evaluates once and returns the
latent unchanged). The math is in ``gnri_core.attention_mask``.

UNet models: ``attn2`` replace patches on every cross-attention layer record the
probabilities of image queries to the selected tokens (summed over heads and tokens);
the layers whose grid is closest to 16x16 make the map.
Flux-style models (``double_blocks``): a ``dit`` double-block replace patch puts an
``optimized_attention_override`` into that block's transformer_options, which sees the
joint q and k (after RoPE) and computes image-query x text-key probabilities for the
selected tokens only, in query chunks (memory bound: ``attention_mask.DEFAULT_MAX_ELEMENTS``
logits at once), then calls the real attention.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from comfy.ldm.modules.attention import optimized_attention
from comfy_api.latest import io, ui

from ..gnri_core import InversionInputError
from ..gnri_core import attention_mask as am
from .comfy_glue import Inversion
from .edit_nodes import check_inversion_for_model
from .inversion_nodes import CATEGORY, INVERSION

logger = logging.getLogger(__name__)

SOURCE, TARGET = 0, 1          # cond_or_uncond index: positive = source, negative = target
DEFAULT_DOWNSCALE = 8          # image pixels per latent cell when the latent format does not say
PREFERRED_ENCODER = "t5xxl"    # Flux: the conditioning is T5's sequence


# --------------------------------------------------------------------------- tokens

def encoder_key(tokens: dict) -> str:
    """Which encoder's token positions index the conditioning: T5 when present (Flux:
    the conditioning sequence is T5's), else the first (SD1 "l"; SDXL "g"/"l" share
    positions)."""
    if not isinstance(tokens, dict) or not tokens:
        raise InversionInputError("clip: tokenize() returned no tokens")
    return PREFERRED_ENCODER if PREFERRED_ENCODER in tokens else next(iter(tokens))


def prompt_tokens(clip, text: str, key: str | None = None) -> tuple[dict, list, str]:
    tokens = clip.tokenize(text)
    key = key or encoder_key(tokens)
    if key not in tokens:
        raise InversionInputError(f"clip: no {key!r} tokens for {text!r}")
    return tokens, am.flatten_tokens(tokens[key]), key


def token_pieces(clip, key: str, keys: list) -> list[str]:
    """The tokenizer's text for each token key (its vocabulary entry; "?" where unknown)."""
    tokenizer = clip.tokenizer
    sub = getattr(tokenizer, f"clip_{key}", None) or getattr(tokenizer, key, None) or tokenizer
    vocab = getattr(sub, "inv_vocab", None) or {}
    return [vocab.get(k, "?") if isinstance(k, int) else "<embedding>" for k in keys]


def select_positions(clip, source_prompt: str, target_prompt: str, words: str):
    """-> (source tokens dict, target tokens dict, source positions, target positions, notes,
    the selected tokens as words {"source": ..., "target": ...})."""
    src_tokens, src, key = prompt_tokens(clip, source_prompt)
    tgt_tokens, tgt, _ = prompt_tokens(clip, target_prompt, key)
    special = set(prompt_tokens(clip, "", key)[1])    # start / end / padding of this tokenizer
    names = am.parse_words(words)
    word_keys = [prompt_tokens(clip, w, key)[1] for w in names] if names else None
    src_pos, tgt_pos, notes = am.select_tokens(src, tgt, special, word_keys, names)
    described = {"source": am.describe_tokens(token_pieces(clip, key, src), src_pos),
                 "target": am.describe_tokens(token_pieces(clip, key, tgt), tgt_pos)}
    return src_tokens, tgt_tokens, src_pos, tgt_pos, notes, described


def cond_length(conditioning: list) -> int:
    return max(int(c[0].shape[1]) for c in conditioning)


# --------------------------------------------------------------------------- recording

def chunk_kinds(cond_or_uncond) -> list:
    """The prompt of each chunk of a model call's batch (ComfyUI's cond_or_uncond)."""
    return list(cond_or_uncond or [SOURCE])


def unet_attn2_keys(diffusion_model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every cross-attention layer."""
    from comfy.ldm.modules.attention import SpatialTransformer

    keys = []
    groups = [("input", list(diffusion_model.input_blocks)), ("middle", [diffusion_model.middle_block]),
              ("output", list(diffusion_model.output_blocks))]
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for module in block.modules():
                if isinstance(module, SpatialTransformer):
                    for index, tb in enumerate(module.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            keys.append((name, number, index))
    return keys


def existing_replace(model, kind: str, key: tuple):
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return replace.get(key, replace.get(key[:2]) if len(key) == 3 else None)


def patch_unet(model, recorder: am.AttentionMaps, latent_hw: tuple[int, int]):
    """A clone of ``model`` with attn2 replace patches that record (chaining any that
    were there)."""
    patched = model.clone()

    for key in unet_attn2_keys(patched.get_model_object("diffusion_model")):
        previous = existing_replace(patched, "attn2", key)

        def attn2(q, k, v, extra_options, previous=previous):
            heads = extra_options["n_heads"]
            kinds = chunk_kinds(extra_options.get("cond_or_uncond"))
            weights = recorder.row_weights(kinds, q.shape[0], k.shape[1], q.device)
            if weights is not None:
                shape = extra_options.get("activations_shape")
                if shape is not None and len(shape) == 4 and shape[2] * shape[3] == q.shape[1]:
                    grid = (int(shape[2]), int(shape[3]))
                else:
                    grid = am.token_grid(q.shape[1], *latent_hw)
                probs = am.attention_to_tokens(am.split_heads(q, heads), am.split_heads(k, heads), weights)
                recorder.add(probs, kinds, grid)
            if previous is not None:
                return previous(q, k, v, extra_options)
            return optimized_attention(q, k, v, heads)

        patched.set_model_attn2_replace(attn2, *key)
    return patched


def patch_flux(model, recorder: am.AttentionMaps, latent_hw: tuple[int, int], patch_size: int):
    """A clone of ``model`` whose chosen double blocks record image->text attention
    probabilities from the joint q, k (chaining existing dit patches and attention
    overrides)."""
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    latent_h, latent_w = latent_hw
    grid = am.patch_grid(latent_h, latent_w, patch_size)
    n_img = grid[0] * grid[1]

    for index in am.pick_blocks(len(diffusion_model.double_blocks)):
        block = diffusion_model.double_blocks[index]
        previous = existing_replace(patched, "dit", ("double_block", index))

        def double_block(args, extras, block=block, previous=previous):
            options = dict(args.get("transformer_options") or {})
            n_txt = args["txt"].shape[1]
            total_img = args["img"].shape[1]
            if total_img < n_img:
                raise InversionInputError(
                    f"inversion: the model sees {total_img} image tokens, fewer than a {latent_h}x{latent_w} "
                    "latent needs; the inversion does not fit this model")
            txt_first = not getattr(block, "flipped_img_txt", False)
            kinds = chunk_kinds(options.get("cond_or_uncond"))
            prior = options.get("optimized_attention_override")

            def override(func, *a, **kw):
                q, k, heads = a[0], a[1], a[3] if len(a) > 3 else kw.get("heads")
                if not kw.get("skip_reshape", False):
                    q, k = am.split_heads(q, heads), am.split_heads(k, heads)
                weights = recorder.row_weights(kinds, q.shape[0], n_txt, q.device)
                if weights is not None:
                    img0 = n_txt if txt_first else 0
                    txt0 = 0 if txt_first else total_img
                    probs = am.attention_to_tokens(q, k, weights, queries=(img0, img0 + n_img),
                                                   tokens=(txt0, txt0 + n_txt), mask=kw.get("mask"))
                    recorder.add(probs, kinds, grid)
                return prior(func, *a, **kw) if prior is not None else func(*a, **kw)

            options["optimized_attention_override"] = override
            args = dict(args, transformer_options=options)
            if previous is not None:
                return previous(args, extras)
            return extras["original_block"](args)

        patched.set_model_patch_replace(double_block, "dit", "double_block", index)
    return patched


# --------------------------------------------------------------------------- evaluation

class EvaluateOnce(comfy.samplers.KSAMPLER):
    """A KSAMPLER that evaluates the (CFG) model once on ``x`` (model space) at the first
    sigma and returns the latent unchanged: patches see one forward pass with ComfyUI's
    own conditioning, batching and model loading."""

    def __init__(self, x: torch.Tensor):
        super().__init__(None)
        self.x = x
        self.evaluations = 0

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = self.x.to(device=noise.device, dtype=noise.dtype)
        sigma = sigmas[0] * x.new_ones([x.shape[0]])
        model_wrap(x, sigma, **extra_args)
        self.evaluations += 1
        return x


def evaluate(model, x: torch.Tensor, sigma: float, source: list, target: list, raw_shape: tuple) -> None:
    """One model evaluation at (x, sigma) with the source prompt as positive and the
    target as negative (cfg != 1, so both run, batched when ComfyUI can)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    sampler = EvaluateOnce(x)
    zeros = torch.zeros(raw_shape)
    comfy.sample.sample_custom(model, zeros, 2.0, sampler, torch.tensor([float(sigma), 0.0]), source, target,
                               zeros, disable_pbar=True, seed=0)


# --------------------------------------------------------------------------- the node's work

def check_trajectory_shape(inversion: Inversion) -> None:
    """The inversion's trajectory latents have its latent shape (an INVERSION object from
    this pack, not a hand-made or mismatched one)."""
    trajectory = inversion.result.trajectory
    if not trajectory or tuple(trajectory[0].shape) != tuple(inversion.latent_shape):
        got = tuple(trajectory[0].shape) if trajectory else None
        raise InversionInputError(f"inversion: trajectory latents {got} do not match its latent shape "
                                  f"{tuple(inversion.latent_shape)}")


def image_downscale(model) -> int:
    """Image pixels per latent cell: the latent format's own ratio where ComfyUI gives one
    (newer versions), else 8 (every 2-D image latent format of ComfyUI 0.3.75 but Cascade)."""
    latent_format = model.get_model_object("latent_format")
    return int(getattr(latent_format, "spacial_downscale_ratio", DEFAULT_DOWNSCALE) or DEFAULT_DOWNSCALE)


def read_attention(model, inversion: Inversion, index: int, weights: dict, source, target) -> tuple[list, tuple]:
    """Evaluates the model once at trajectory latent ``index`` with recording patches on a
    clone -> (one map per prompt on the latent, the attention grid)."""
    batch, _, height, width = inversion.latent_shape[:4]
    recorder = am.AttentionMaps(weights, batch)
    diffusion_model = model.get_model_object("diffusion_model")
    patch_size = int(getattr(diffusion_model, "patch_size", 1) or 1)
    if hasattr(diffusion_model, "double_blocks"):
        patched = patch_flux(model, recorder, (height, width), patch_size)
    elif hasattr(diffusion_model, "input_blocks"):
        patched, patch_size = patch_unet(model, recorder, (height, width)), 1
    else:
        raise InversionInputError(
            f"model: {type(diffusion_model).__name__} is neither a UNet (SD1.x/2.x/XL) nor a Flux-style "
            "double-block transformer; Attention Mask Blend cannot read its attention")
    try:
        evaluate(patched, inversion.result.trajectory[index], float(inversion.sigmas[index]), source, target,
                 tuple(inversion.latent_shape))
    except RuntimeError as e:
        if "cannot be multiplied" not in str(e):
            raise
        raise InversionInputError(
            f"source/target: the conditioning does not fit this model ({e}); give the model's own CLIP, "
            "or connect conditioning encoded for this model to the source and target inputs") from e
    maps, grid = recorder.prompt_maps()
    if grid is None:
        raise InversionInputError(
            "model: no attention was recorded during the evaluation (this ComfyUI may not support "
            "attention patches / optimized_attention_override for this model)")
    if patch_size > 1:
        maps = [am.crop_grid(m, patch_size, (height, width)) for m in maps]
    return maps, grid


@torch.no_grad()
def attention_mask_blend(model, clip, inversion: Inversion, source_prompt: str, target_prompt: str,
                         words: str = "", threshold: float = am.DEFAULT_THRESHOLD, blur: float = 1.0,
                         dilate: int = 1, step: int = -1, mask=None, mask_mode: str = "replace",
                         source=None, target=None) -> dict:
    """-> {"mask", "attention" (both at image resolution), "notes", "step", "sigma", "grid",
    "tokens" (positions), "words" (the selected tokens as words)}."""
    if not all(hasattr(inversion, a) for a in ("result", "family", "latent_shape", "sigmas")):
        raise InversionInputError("inversion: expected the INVERSION output of GNRI Invert")
    check_inversion_for_model(model, inversion)
    check_trajectory_shape(inversion)
    if len(inversion.latent_shape) != 4:
        raise InversionInputError(f"inversion: latents of shape {tuple(inversion.latent_shape)}; "
                                  "Attention Mask Blend handles image latents (B, C, H, W)")
    index = am.choose_step(len(inversion.result.trajectory) - 1, step)
    batch, _, height, width = inversion.latent_shape[:4]
    am.check_mask_options(batch, (height, width), threshold, blur, dilate, mask, mask_mode)  # before the model runs

    src_tokens, tgt_tokens, src_pos, tgt_pos, notes, described = select_positions(
        clip, source_prompt, target_prompt, words)
    if src_pos or tgt_pos:
        if source is None:
            source = clip.encode_from_tokens_scheduled(src_tokens)
        if target is None:
            target = clip.encode_from_tokens_scheduled(tgt_tokens)
    weights = {}
    for kind, positions, cond, name in ((SOURCE, src_pos, source, "source"), (TARGET, tgt_pos, target, "target")):
        if positions:
            weights[kind], dropped = am.conditioning_weights(positions, cond_length(cond), name)
            notes += dropped
    weights = {kind: w for kind, w in weights.items() if w is not None}

    maps, grid = [], None
    if weights:
        maps, grid = read_attention(model, inversion, index, weights, source, target)
    elif not notes:
        notes.append("no selected token lies within the conditioning; the attention mask is empty")
    for note in notes:
        logger.warning("Attention Mask Blend: %s", note)

    latent_mask, raw = am.mask_from_maps(maps, batch, (height, width), threshold, blur, dilate, mask, mask_mode)
    downscale = image_downscale(model)
    return {"mask": am.upscale_mask(latent_mask, downscale), "attention": am.upscale_mask(raw, downscale),
            "notes": notes, "step": index, "sigma": float(inversion.sigmas[index]), "grid": grid,
            "tokens": {"source": src_pos, "target": tgt_pos}, "words": described}


def summary(result: dict) -> str:
    """The node's text: what was read, from which tokens, how much the mask covers."""
    grid = result["grid"]
    read = f"attention read at {grid[0]}x{grid[1]}" if grid else "no attention read"
    lines = [f"step {result['step']} (sigma {result['sigma']:.4g}): {read}",
             f"source words: {result['words']['source']}",
             f"target words: {result['words']['target']}",
             f"mask covers {float(result['mask'].mean()) * 100:.1f}%"]
    lines += [f"warning: {n}" for n in result["notes"]]
    return "\n".join(lines)


class AttentionMaskBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GNRIAttentionMaskBlend",
            display_name="Attention Mask Blend",
            category=CATEGORY,
            description=("Where the edit should happen, from the model's own attention to the tokens the "
                         "target prompt changed (or to named words), read in one model evaluation on the "
                         "inverted latent. Feed the MASK to Prompt Swap Edit."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Clip.Input("clip", tooltip="Tokenises the prompts (and encodes them unless conditioning is given)."),
                INVERSION.Input("inversion"),
                io.String.Input("source_prompt", display_name="source prompt", multiline=True, default="",
                                placeholder="what the image shows (the prompt of the inversion)",
                                tooltip="The prompt that describes the image (used for the inversion)."),
                io.String.Input("target_prompt", display_name="target prompt", multiline=True, default="",
                                placeholder="the edited prompt (change only what should change)",
                                tooltip="The edited prompt; tokens only in one of the two prompts make the mask."),
                io.Float.Input("threshold", default=am.DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask where the attention map (normalised by its max) reaches this."),
                io.Float.Input("blur", default=1.0, min=0.0, max=64.0, step=0.1,
                               tooltip="Gaussian blur of the mask, standard deviation in latent cells (8 px on SD and Flux)."),
                io.Int.Input("dilate", default=1, min=0, max=64,
                             tooltip="Grow the thresholded mask by this many latent cells (8 px on SD and Flux) before blurring."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip=("Which latent of the inverted trajectory the model looks at: 0 = the clean "
                                      "image, N = the inverted noise; -1 = the middle one.")),
                io.String.Input("words", default="", optional=True,
                                tooltip="Comma-separated words to use instead of the changed tokens."),
                io.Mask.Input("mask", optional=True, tooltip="A mask of your own (any size; batch 1 or the latent's)."),
                io.Combo.Input("mask_mode", options=list(am.COMBINE_MODES), default="replace", optional=True,
                               tooltip="With a mask: replace the attention mask, or take their union / intersection."),
                io.Conditioning.Input("source", optional=True,
                                      tooltip="Evaluate with this source conditioning (default: source_prompt "
                                              "encoded by clip)."),
                io.Conditioning.Input("target", optional=True,
                                      tooltip="Evaluate with this target conditioning (default: target_prompt "
                                              "encoded by clip)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask"),
                io.Mask.Output(display_name="attention"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, inversion, source_prompt, target_prompt, threshold, blur, dilate, step,
                words="", mask=None, mask_mode="replace", source=None, target=None) -> io.NodeOutput:
        result = attention_mask_blend(model, clip, inversion, source_prompt, target_prompt, words or "",
                                      threshold, blur, dilate, step, mask, mask_mode, source, target)
        preview = ui.PreviewMask(result["mask"], cls=cls).as_dict()
        return io.NodeOutput(result["mask"], result["attention"], ui={**preview, "text": (summary(result),)})
