"""Variants measured beside the core's default: the secant GNRI without its Euler
predictor (``SolverOptions.predictor = "none"``: every step starts from z_prev), so the
benchmark shows what the predictor contributes."""
from __future__ import annotations

from .methods import BY_KEY, SPECS, Spec, add_spec


def register(core) -> None:
    """Labels the default and adds the secant GNRI without the predictor."""
    del core  # the options exist in every core this benchmark runs against
    i = SPECS.index(BY_KEY["gnri"])
    SPECS[i] = BY_KEY["gnri"] = Spec("gnri", "gnri secant + Euler predictor (default)", "gnri",
                                     {"update": "secant"})
    add_spec(Spec("gnri_nopred", "gnri secant, no predictor", "gnri",
                  {"update": "secant", "predictor": "none"}))
