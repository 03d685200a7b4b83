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
import math

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
UNET_TARGET_GRID = 16          # TurboEdit / prompt-to-prompt: cross-attention at ~16x16
FLUX_MAX_BLOCKS = 4            # double blocks whose attention is read (second half of the stack)
LATENT_DOWNSCALE = 8           # image pixels per latent cell (SD1.x/2.x/XL and Flux VAEs)
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


def select_positions(clip, source_prompt: str, target_prompt: str, words: str):
    """-> (source tokens dict, target tokens dict, source positions, target positions, notes)."""
    src_tokens, src, key = prompt_tokens(clip, source_prompt)
    tgt_tokens, tgt, _ = prompt_tokens(clip, target_prompt, key)
    special = set(prompt_tokens(clip, "", key)[1])    # start / end / padding of this tokenizer
    names = am.parse_words(words)
    word_keys = [prompt_tokens(clip, w, key)[1] for w in names] if names else None
    src_pos, tgt_pos, notes = am.select_tokens(src, tgt, special, word_keys, names)
    return src_tokens, tgt_tokens, src_pos, tgt_pos, notes


def cond_length(conditioning: list) -> int:
    return max(int(c[0].shape[1]) for c in conditioning)


# --------------------------------------------------------------------------- recording

class AttentionRecorder:
    """Per-kind (source / target) sums of attention maps, keyed by grid; filled by the
    patches during the evaluation."""

    def __init__(self, weights: dict[int, torch.Tensor], batch: int, latent_hw: tuple[int, int]):
        self.weights = weights          # kind -> (T,) 0/1 over conditioning positions
        self.batch = batch              # latent batch
        self.latent_hw = latent_hw
        self.maps: dict[tuple, torch.Tensor] = {}   # (kind, h, w) -> (batch, h*w)
        self.counts: dict[tuple, int] = {}
        self.calls = 0

    def batch_weights(self, cond_or_uncond, total_batch: int, length: int, device) -> torch.Tensor | None:
        """(total_batch, length) token weights for the chunks of this model call, or None
        when no chunk has selected tokens."""
        chunks = list(cond_or_uncond or [SOURCE])
        per = total_batch // len(chunks)
        rows = []
        for kind in chunks:
            w = self.weights.get(kind)
            w = torch.zeros(length) if w is None else am.fit_weights(w, length)
            rows.append(w.unsqueeze(0).expand(per, -1))
        weights = torch.cat(rows).to(device)
        return weights if torch.count_nonzero(weights) else None

    def add(self, probs: torch.Tensor, cond_or_uncond, grid: tuple[int, int]) -> None:
        chunks = list(cond_or_uncond or [SOURCE])
        for kind, part in zip(chunks, probs.float().cpu().chunk(len(chunks))):
            if kind not in self.weights:
                continue
            if part.shape[0] != self.batch:  # conditioning batch broadcast differently
                part = part.mean(0, keepdim=True).expand(self.batch, -1)
            key = (kind, *grid)
            self.maps[key] = self.maps.get(key, 0) + part
            self.counts[key] = self.counts.get(key, 0) + 1
        self.calls += 1

    def prompt_maps(self, grid: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """One (batch, h, w) map per prompt kind, averaged over the layers at ``grid``
        (default: the recorded grid closest to 16x16)."""
        if not self.maps:
            return []
        grids = {(h, w) for _, h, w in self.maps}
        grid = grid or am.pick_resolution(grids, UNET_TARGET_GRID)
        out = []
        for kind in sorted(self.weights):
            key = (kind, *grid)
            if key in self.maps:
                out.append((self.maps[key] / self.counts[key]).view(self.batch, *grid))
        return out


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


def patch_unet(model, recorder: AttentionRecorder):
    """A clone of ``model`` with attn2 replace patches that record (chaining any that
    were there)."""
    patched = model.clone()
    latent_h, latent_w = recorder.latent_hw

    for key in unet_attn2_keys(patched.get_model_object("diffusion_model")):
        previous = existing_replace(patched, "attn2", key)

        def attn2(q, k, v, extra_options, previous=previous):
            heads = extra_options["n_heads"]
            weights = recorder.batch_weights(extra_options.get("cond_or_uncond"), q.shape[0], k.shape[1], q.device)
            if weights is not None:
                shape = extra_options.get("activations_shape")
                if shape is not None and len(shape) == 4 and shape[2] * shape[3] == q.shape[1]:
                    grid = (int(shape[2]), int(shape[3]))
                else:
                    grid = am.token_grid(q.shape[1], latent_h, latent_w)
                probs = am.attention_to_tokens(am.split_heads(q, heads), am.split_heads(k, heads), weights)
                recorder.add(probs, extra_options.get("cond_or_uncond"), grid)
            if previous is not None:
                return previous(q, k, v, extra_options)
            return optimized_attention(q, k, v, heads)

        patched.set_model_attn2_replace(attn2, *key)
    return patched


def flux_blocks(depth: int, count: int = FLUX_MAX_BLOCKS) -> list[int]:
    """Up to ``count`` double blocks, evenly spread over the second half of the stack."""
    if depth <= count:
        return list(range(depth))
    lo = depth // 2
    return sorted({round(lo + i * (depth - 1 - lo) / (count - 1)) for i in range(count)})


def patch_flux(model, recorder: AttentionRecorder):
    """A clone of ``model`` whose chosen double blocks record image->text attention
    probabilities from the joint q, k (chaining existing dit patches and attention
    overrides)."""
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    patch_size = int(getattr(diffusion_model, "patch_size", 1) or 1)
    latent_h, latent_w = recorder.latent_hw
    grid = (math.ceil(latent_h / patch_size), math.ceil(latent_w / patch_size))
    n_img = grid[0] * grid[1]

    for index in flux_blocks(len(diffusion_model.double_blocks)):
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
            cond_or_uncond = options.get("cond_or_uncond")
            prior = options.get("optimized_attention_override")

            def override(func, *a, **kw):
                q, k, heads = a[0], a[1], a[3] if len(a) > 3 else kw.get("heads")
                if not kw.get("skip_reshape", False):
                    q, k = am.split_heads(q, heads), am.split_heads(k, heads)
                weights = recorder.batch_weights(cond_or_uncond, q.shape[0], n_txt, q.device)
                if weights is not None:
                    img0 = n_txt if txt_first else 0
                    txt0 = 0 if txt_first else total_img
                    probs = am.attention_to_tokens(q, k, weights, queries=(img0, img0 + n_img),
                                                   tokens=(txt0, txt0 + n_txt), mask=kw.get("mask"))
                    recorder.add(probs, cond_or_uncond, grid)
                return prior(func, *a, **kw) if prior is not None else func(*a, **kw)

            options["optimized_attention_override"] = override
            args = dict(args, transformer_options=options)
            if previous is not None:
                return previous(args, extras)
            return extras["original_block"](args)

        patched.set_model_patch_replace(double_block, "dit", "double_block", index)
    return patched, grid, patch_size


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

def check_trajectory(inversion: Inversion) -> None:
    trajectory = inversion.result.trajectory
    if not trajectory or tuple(trajectory[0].shape) != tuple(inversion.latent_shape):
        got = tuple(trajectory[0].shape) if trajectory else None
        raise InversionInputError(f"inversion: trajectory latents {got} do not match its latent shape "
                                  f"{tuple(inversion.latent_shape)}")


def choose_step(inversion: Inversion, step: int) -> int:
    """-1: the middle of the trajectory (rounded towards noise); else 0 (the clean latent)
    .. N (the inverted noise)."""
    n = len(inversion.result.trajectory) - 1
    if step == -1:
        return max(1, (n + 1) // 2) if n >= 1 else 0
    if not 0 <= step <= n:
        raise InversionInputError(f"step: must be -1 (middle) or lie in [0, {n}] (this inversion has {n} steps), "
                                  f"got {step}")
    return step


@torch.no_grad()
def attention_mask_blend(model, clip, inversion: Inversion, source_prompt: str, target_prompt: str,
                         words: str = "", threshold: float = am.DEFAULT_THRESHOLD, blur: float = 1.0,
                         dilate: int = 1, step: int = -1, mask=None, mask_mode: str = "replace",
                         source=None, target=None) -> dict:
    """-> {"mask", "attention" (both (B, 8h, 8w)), "notes", "step", "sigma", "grid", "tokens"}."""
    if not all(hasattr(inversion, a) for a in ("result", "family", "latent_shape", "sigmas")):
        raise InversionInputError("inversion: expected the INVERSION output of GNRI Invert")
    check_inversion_for_model(model, inversion)
    check_trajectory(inversion)
    if len(inversion.latent_shape) != 4:
        raise InversionInputError(f"inversion: latents of shape {tuple(inversion.latent_shape)}; "
                                  "Attention Mask Blend handles image latents (B, C, H, W)")
    if mask_mode not in am.COMBINE_MODES:
        raise InversionInputError(f"mask_mode: unknown {mask_mode!r}; expected one of {list(am.COMBINE_MODES)}")
    index = choose_step(inversion, step)
    sigma = float(inversion.sigmas[index])
    batch, _, height, width = inversion.latent_shape[:4]
    if mask is not None:  # fail before the model runs
        am.fit_user_mask(mask, batch, (height, width))

    src_tokens, tgt_tokens, src_pos, tgt_pos, notes = select_positions(clip, source_prompt, target_prompt, words)
    if src_pos or tgt_pos:
        if source is None:
            source = clip.encode_from_tokens_scheduled(src_tokens)
        if target is None:
            target = clip.encode_from_tokens_scheduled(tgt_tokens)
    weights = {}
    for kind, positions, cond, name in ((SOURCE, src_pos, source, "source"), (TARGET, tgt_pos, target, "target")):
        if not positions:
            continue
        length = cond_length(cond)
        dropped = [p for p in positions if p >= length]
        if dropped:
            note = (f"{name}: token positions {dropped} lie beyond its conditioning ({length} tokens) "
                    "and are ignored; tokenise with the CLIP that encoded the conditioning")
            logger.warning("Attention Mask Blend: %s", note)
            notes.append(note)
        if len(dropped) < len(positions):
            weights[kind] = am.position_weights(positions, length)

    maps, grid = [], None
    if weights:
        recorder = AttentionRecorder(weights, batch, (height, width))
        diffusion_model = model.get_model_object("diffusion_model")
        if hasattr(diffusion_model, "double_blocks"):
            patched, grid, patch_size = patch_flux(model, recorder)
        elif hasattr(diffusion_model, "input_blocks"):
            patched, patch_size = patch_unet(model, recorder), 1
        else:
            raise InversionInputError(
                f"model: {type(diffusion_model).__name__} is neither a UNet (SD1.x/2.x/XL) nor a Flux-style "
                "double-block transformer; Attention Mask Blend cannot read its attention")
        x = inversion.result.trajectory[index]
        try:
            evaluate(patched, x, sigma, source, target, tuple(inversion.latent_shape))
        except RuntimeError as e:
            if "cannot be multiplied" not in str(e):
                raise
            raise InversionInputError(
                f"source/target: the conditioning does not fit this model ({e}); give the model's own CLIP, "
                "or connect conditioning encoded for this model to the source and target inputs") from e
        if not recorder.maps:
            raise InversionInputError(
                "model: no attention was recorded during the evaluation (this ComfyUI may not support "
                "attention patches / optimized_attention_override for this model)")
        if grid is None:
            grid = am.pick_resolution({(h, w) for _, h, w in recorder.maps}, UNET_TARGET_GRID)
        maps = recorder.prompt_maps(grid)
        if patch_size > 1:
            maps = [am.crop_grid(m, patch_size, (height, width)) for m in maps]
    elif not notes:
        notes.append("no selected token lies within the conditioning; the attention mask is empty")

    latent_mask, raw = am.mask_from_maps(maps, batch, (height, width), threshold, blur, dilate, mask, mask_mode)
    return {"mask": am.upscale_mask(latent_mask, LATENT_DOWNSCALE),
            "attention": am.upscale_mask(raw, LATENT_DOWNSCALE),
            "notes": notes, "step": index, "sigma": sigma, "grid": grid,
            "tokens": {"source": src_pos, "target": tgt_pos}}


def summary(result: dict) -> str:
    mask = result["mask"]
    lines = [(f"step {result['step']} (sigma {result['sigma']:.4g}), attention grid {result['grid']}, "
              f"source tokens {result['tokens']['source']}, target tokens {result['tokens']['target']}, "
              f"mask covers {float(mask.mean()) * 100:.1f}%")]
    lines += [f"warning: {n}" for n in result["notes"]]
    return "\n".join(lines)


class AttentionMaskBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttentionMaskBlend",
            display_name="Attention Mask Blend",
            category=CATEGORY,
            description=("Where the edit should happen, from the model's own attention to the tokens the "
                         "target prompt changed (or to named words), read in one model evaluation on the "
                         "inverted latent. Feed the MASK to Prompt Swap Edit."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Clip.Input("clip", tooltip="Tokenises the prompts (and encodes them unless conditioning is given)."),
                INVERSION.Input("inversion"),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="The prompt that describes the image (used for the inversion)."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The edited prompt; tokens only in one of the two prompts make the mask."),
                io.Float.Input("threshold", default=am.DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask where the attention map (normalised by its max) reaches this."),
                io.Float.Input("blur", default=1.0, min=0.0, max=64.0, step=0.1,
                               tooltip="Gaussian blur of the mask, standard deviation in latent cells (8 px)."),
                io.Int.Input("dilate", default=1, min=0, max=64,
                             tooltip="Grow the thresholded mask by this many latent cells (8 px) before blurring."),
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
