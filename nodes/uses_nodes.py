"""GNRI Interpolate and GNRI Concept Noise: the paper's other uses of exact inversion
(thin V3 nodes over ``gnri_core.interpolate``)."""
from __future__ import annotations

import dataclasses

import torch

from comfy_api.latest import io

from ..gnri_core import InversionInputError, concept_noise, frame_weights, slerp
from .comfy_glue import Inversion, InvertedNoise
from .edit_nodes import check_inversion_for_model, interpolate_conditioning, prompt_swap_edit
from .inversion_nodes import CATEGORY, INVERSION

FROZEN_MAPS = ("ancestral", "eta", "seed")


def check_pair(a: Inversion, b: Inversion) -> None:
    """Two inversions that can be interpolated: same model, schedule, size, cfg and maps."""
    def differ(what, value_a, value_b):
        raise InversionInputError(f"inversion_b: its {what} {value_b} differs from inversion_a's {value_a}; "
                                  "invert both images with the same model, schedule, latent size and cfg")
    if (a.model_name, a.prediction) != (b.model_name, b.prediction):
        differ("model", f"{a.model_name} ({a.prediction})", f"{b.model_name} ({b.prediction})")
    if a.latent_shape != b.latent_shape:
        differ("latent shape", a.latent_shape, b.latent_shape)
    if a.sigmas.shape != b.sigmas.shape or not torch.allclose(a.sigmas, b.sigmas):
        differ("schedule", [round(float(s), 4) for s in a.sigmas], [round(float(s), 4) for s in b.sigmas])
    if a.settings.get("cfg") != b.settings.get("cfg"):
        differ("cfg", a.settings.get("cfg"), b.settings.get("cfg"))
    if a.settings.get("ancestral") or b.settings.get("ancestral"):
        maps_a, maps_b = ({k: inv.settings.get(k) for k in FROZEN_MAPS} for inv in (a, b))
        if maps_a != maps_b:
            raise InversionInputError(
                f"inversion_b: its frozen noise maps ({maps_b}) are not inversion_a's ({maps_a}); the "
                "regenerating sampler draws one set of maps from one seed, so invert both images with "
                "the same sampler and noise_seed (or with sampler euler)")


def interpolate(model, a: Inversion, b: Inversion, positive_a, positive_b, frames: int,
                negative=None) -> dict:
    """``frames`` regenerations from slerp(noise_a, noise_b, t) with lerp(positive_a, positive_b, t),
    t = 0 .. 1, in one LATENT batch (frame-major); the ends are the two reconstructions."""
    check_pair(a, b)
    check_inversion_for_model(model, a)
    check_inversion_for_model(model, b)
    try:
        interpolate_conditioning(positive_a, positive_b, 0.0)
    except InversionInputError as error:
        raise InversionInputError(f"positive_b (against positive_a): {error}") from None
    cfg = a.settings.get("cfg", 1.0)
    samples = []
    for t in frame_weights(frames):
        noise = slerp(a.result.noise, b.result.noise, t)
        frame = dataclasses.replace(a, result=dataclasses.replace(a.result, noise=noise))
        edited, _notes = prompt_swap_edit(model, frame, positive_a, positive_b, t, cfg, "empty", 0,
                                          negative=negative)
        samples.append(edited["samples"])
    return {"samples": torch.cat(samples)}


class ConceptNoise:
    """NOISE for SamplerCustomAdvanced: one draw of ``concept_noise`` per latent of the
    batch it is given, seeded by ``seed`` (landing there like ``InvertedNoise``)."""

    def __init__(self, inversion: Inversion, model_sampling, spread: float, seed: int):
        self.seed = seed
        self.inversion, self.model_sampling, self.spread = inversion, model_sampling, spread

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        count = input_latent["samples"].shape[0]
        generator = torch.Generator().manual_seed(int(self.seed))
        draws = concept_noise(self.inversion.result.noise.cpu(), count, self.spread, generator)
        inversion = self.inversion
        return InvertedNoise(draws, float(inversion.sigmas[-1]), self.model_sampling,
                             inversion.latent_format, self.seed).generate_noise(input_latent)


class GNRIInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GNRIInterpolate",
            display_name="GNRI Interpolate",
            category=CATEGORY,
            description=("Frames between two inverted images: spherical interpolation of their noises, "
                         "linear interpolation of their prompts; the end frames reconstruct the inputs."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made both inversions."),
                INVERSION.Input("inversion_a", tooltip="The first image's inversion (frame 0)."),
                INVERSION.Input("inversion_b", tooltip=("The last frame's inversion: same model, schedule, "
                                                        "latent size and cfg as inversion_a.")),
                io.Conditioning.Input("positive_a", tooltip="The prompt inversion_a was made with."),
                io.Conditioning.Input("positive_b", tooltip="The prompt inversion_b was made with."),
                io.Int.Input("frames", default=8, min=2, max=1024, tooltip="Frames, both ends included."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The inversions' negative when cfg != 1 (default: zeroed prompt)."),
            ],
            outputs=[io.Latent.Output(display_name="frames")],
        )

    @classmethod
    def execute(cls, model, inversion_a, inversion_b, positive_a, positive_b, frames,
                negative=None) -> io.NodeOutput:
        return io.NodeOutput(interpolate(model, inversion_a, inversion_b, positive_a, positive_b, frames,
                                         negative))


class GNRIConceptNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GNRIConceptNoise",
            display_name="GNRI Concept Noise",
            category=CATEGORY,
            description=("Seeds near the inverted noises of a few examples of a concept, so that the "
                         "concept's prompt draws it more often than from random noise (rare concepts)."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                INVERSION.Input("inversion", tooltip="GNRI Invert of a batch of examples of the concept."),
                io.Float.Input("spread", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip=("Angle of each draw from the examples' centroid, in units of 90°: 0 "
                                        "always gives the centroid, 1 plain random noise; 0.5 keeps a cosine "
                                        "similarity of 0.71 with it.")),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("batch_size", default=4, min=1, max=4096, tooltip="Draws in the latent output."),
            ],
            outputs=[io.Noise.Output(display_name="noise"),
                     io.Latent.Output(display_name="latent",
                                      tooltip="An empty latent of the examples' size with batch_size draws.")],
        )

    @classmethod
    def execute(cls, model, inversion, spread, noise_seed, batch_size) -> io.NodeOutput:
        check_inversion_for_model(model, inversion)
        shape = (batch_size, *inversion.latent_shape[1:])
        noise = ConceptNoise(inversion, model.get_model_object("model_sampling"), spread, noise_seed)
        return io.NodeOutput(noise, {"samples": torch.zeros(shape)})
