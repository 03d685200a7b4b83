"""gnri_core: torch-only inversion of deterministic diffusion samplers.

    from gnri_core import invert, reconstruct
    result = invert(denoise, x0, sigmas, method="gnri", family="eps")
    x = reconstruct(denoise, result.noise, sigmas.flip(0))
"""
from .errors import InversionError, InversionInputError
from .interpolate import concept_noise, frame_weights, slerp
from .invert import (METHODS, check_family, check_latent, check_method, check_round_trip, check_sigmas, invert,
                     reconstruct, round_trip_error)
from .result import InversionResult, StepResult
from .sampling import sample_guided_nr, sigmas_ascend
from .solvers import DEFAULTS, SolverOptions

__all__ = [
    "invert", "reconstruct", "sample_guided_nr", "sigmas_ascend", "METHODS", "DEFAULTS",
    "SolverOptions", "InversionResult", "StepResult", "InversionError", "InversionInputError",
    "check_family", "check_latent", "check_method", "check_sigmas", "check_round_trip", "round_trip_error",
    "slerp", "frame_weights", "concept_noise",
]
