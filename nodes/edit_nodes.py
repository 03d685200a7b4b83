"""Prompt Swap Edit: regenerate an INVERSION with a target prompt (TurboEdit / GNRI editing)."""
from __future__ import annotations


import torch

import comfy.sample
import latent_preview
from comfy_api.latest import io, ui

from ..gnri_core.attention_mask import fit_user_mask
from ..gnri_core import InversionInputError
from .comfy_glue import (Inversion, batch_notes, check_finite, check_inversion_for_model,  # noqa: F401 (attention)
                         guided_nr_sampler, notes_text, zero_conditioning)
from .inversion_nodes import CATEGORY, INVERSION, choice

NEGATIVES = {"source": lambda source, target: source,
             "empty": lambda source, target: zero_conditioning(target)}


def interpolate_conditioning(source: list, target: list, strength: float) -> list:
    """source + strength * (target - source), for the embeddings and pooled outputs
    (strength 0: source, 1: target, beyond: extrapolation)."""
    if len(source) != len(target):
        raise InversionInputError(
            f"target: has {len(target)} conditioning entries but source has {len(source)}; "
            "encode both prompts the same way")
    mixed = []
    for (src, src_extra), (tgt, tgt_extra) in zip(source, target):
        if src.shape != tgt.shape:
            raise InversionInputError(
                f"target: embedding shape {tuple(tgt.shape)} differs from source {tuple(src.shape)}; "
                "keep both prompts within the same number of 75-token chunks")
        extra = dict(tgt_extra)
        if src_extra.get("pooled_output") is not None and tgt_extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.lerp(src_extra["pooled_output"], tgt_extra["pooled_output"], strength)
        mixed.append([torch.lerp(src, tgt, strength), extra])
    return mixed


def switch_at_sigma(before: list, after: list, boundary: float) -> list:
    """``before`` while sigma > boundary, ``after`` below (ComfyUI timestep ranges in sigma)."""
    early = [[t, {**extra, "timestep_end": boundary}] for t, extra in before]
    late = [[t, {**extra, "timestep_start": boundary}] for t, extra in after]
    return early + late


def latent_mask(mask: torch.Tensor, inversion: Inversion) -> torch.Tensor:
    """A MASK (B or 1, H, W) at any resolution, as (B, 1, h, w) at the latent's resolution."""
    batch, _, height, width = inversion.latent_shape[:4]
    return fit_user_mask(mask, batch, (height, width)).unsqueeze(1)


def blended_cfg(model, scale_map: torch.Tensor):
    """A clone of ``model`` whose CFG uses a per-pixel scale (AIDI blended guidance)."""
    patched = model.clone()

    def cfg_function(args):
        scale = scale_map.to(args["cond"].device, args["cond"].dtype)
        return args["uncond"] + (args["cond"] - args["uncond"]) * scale
    patched.set_model_sampler_cfg_function(cfg_function)
    return patched


def prompt_swap_edit(model, inversion: Inversion, source, target, strength: float, edit_cfg: float,
                     negative_mode: str, start_step: int, mask=None, blend_cfg: float = 0.0,
                     negative=None) -> tuple[dict, list[str]]:
    """-> (edited LATENT, warnings)."""
    check_finite(strength=strength, edit_cfg=edit_cfg, blend_cfg=blend_cfg)
    check_inversion_for_model(model, inversion)
    notes = batch_notes(inversion.latent_shape[0], source=source, target=target, negative=negative)
    if blend_cfg > 0 and mask is None:
        notes.append("blend_cfg: needs a mask and is ignored without one; connect a mask (e.g. from "
                     "Attention Mask Blend) or set blend_cfg to 0")
    sigmas = inversion.sigmas.flip(0)
    steps = len(sigmas) - 1
    if not 0 <= start_step <= steps:
        raise InversionInputError(f"start_step: must lie in [0, {steps}], got {start_step}")
    edited = interpolate_conditioning(source, target, strength)
    if 0 < start_step < steps:
        boundary = 0.5 * float(sigmas[start_step - 1] + sigmas[start_step])
        edited = switch_at_sigma(source, edited, boundary)
    elif start_step == steps:
        edited = source
    if negative is None:
        negative = choice(NEGATIVES, negative_mode, "negative_mode")(source, target)
    options = {k: v for k, v in inversion.settings.items() if k in ("ancestral", "eta")}
    cfg = edit_cfg
    if mask is not None:
        mask = latent_mask(mask, inversion)
        options.update(trajectory=inversion.result.trajectory[::-1], mask=mask)
        if blend_cfg > 0:
            model = blended_cfg(model, (blend_cfg - edit_cfg) * mask + edit_cfg)
            cfg = blend_cfg if blend_cfg != 1.0 else edit_cfg
    sampler = guided_nr_sampler(inversion.settings.get("method", "gnri"), **options)
    start = inversion.latent_format.process_out(inversion.result.noise)
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample_custom(
        model, torch.zeros_like(start), cfg, sampler, sigmas, edited, negative, start,
        callback=callback, seed=inversion.settings.get("seed", 0))
    return {"samples": samples}, notes


class PromptSwapEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GNRIPromptSwapEdit",
            display_name="Prompt Swap Edit",
            category=CATEGORY,
            description=("Regenerates an inverted image with a target prompt, so that only what the "
                         "prompt changed changes. Strength 0 and no mask reproduce the input."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                INVERSION.Input("inversion"),
                io.Conditioning.Input("source", tooltip="The prompt used for the inversion."),
                io.Conditioning.Input("target", tooltip="The edited prompt (same wording, one thing changed)."),
                io.Float.Input("strength", default=1.0, min=-5.0, max=5.0, step=0.05,
                               tooltip="Interpolates source→target embeddings; >1 extrapolates, <0 goes away."),
                io.Float.Input("edit_cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="CFG of the edit (1.2 adds strength on SDXL-Turbo; higher values leak more)."),
                io.Combo.Input("negative_mode", options=list(NEGATIVES), default="source",
                               tooltip="Negative for CFG: the source prompt or the zeroed (empty) target."),
                io.Int.Input("start_step", default=0, min=0, max=10000,
                             tooltip="Steps before this one keep the source prompt (layout); then the target."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Edit only here; elsewhere each step keeps the inverted trajectory."),
                io.Float.Input("blend_cfg", default=0.0, min=0.0, max=30.0, step=0.1, round=0.01, optional=True,
                               tooltip="With a mask: CFG inside it (AIDI blended guidance); 0 = off."),
                io.Conditioning.Input("negative", optional=True, tooltip="Overrides negative_mode."),
            ],
            outputs=[io.Latent.Output(display_name="edited_latent")],
        )

    @classmethod
    def execute(cls, model, inversion, source, target, strength, edit_cfg, negative_mode, start_step,
                mask=None, blend_cfg=0.0, negative=None) -> io.NodeOutput:
        edited, notes = prompt_swap_edit(model, inversion, source, target, strength, edit_cfg, negative_mode,
                                         start_step, mask, blend_cfg, negative)
        return io.NodeOutput(edited, ui=ui.PreviewText(notes_text(notes)))
