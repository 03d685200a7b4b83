"""Result types: one per step, one per inversion (optimistix-style: value, code, stats)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

CONVERGED = "converged"      # relative residual reached the tolerance
MAX_ITERS = "max_iterations"  # iteration budget used up (the normal case for few-step budgets)
SINGLE_STEP = "single_step"  # ddim: one evaluation, no iteration
# the round-trip check skips a deterministic inversion whose every step's relative residual is
# within this on every sample (the extra iterations' tolerance; measured: docs/benchmark.md)
SKIP_CHECK_RESIDUAL = 1e-3


@dataclass(frozen=True)
class StepResult:
    """What a solver returns for one step.

    ``residual`` is the relative residual ||r(z)|| / ||z_prev|| (max over the batch)
    of the best iterate the solver evaluated; ``z`` is the map applied to it, so the
    true residual of ``z`` is usually smaller.
    """

    z: torch.Tensor
    iterations: int
    nfe: int
    residual: float
    code: str
    history: tuple[float, ...] = ()
    backward_passes: int = 0
    sample_residuals: Optional[torch.Tensor] = None  # per sample, ``residual``'s measure (GNRI secant only)


@dataclass
class InversionResult:
    """Everything ``invert`` found.

    noise:       the latent at sigma_max (what sampling starts from).
    trajectory:  latents at every sigma, ``trajectory[0]`` is the input x0.
    sigmas:      the ascending sigmas used.
    nfe:         exact number of ``denoise`` calls.
    residuals:   final relative residual per step (see :class:`StepResult`).
    iterations:  solver iterations per step.
    codes:       result code per step.
    histories:   relative residual after every iteration, per step.
    round_trip:  per sample, the relative error of regenerating from ``noise`` (only with
                 ``round_trip_check``; empty otherwise).
    fell_back:   per sample, whether the round-trip check kept ``ddim``'s inversion.
    compared:    per sample, whether the check also inverted it with ``ddim`` (what one
                 image per inversion pays: 2 more calls per step where True).
    round_trip_calls: the model calls of that check (included in ``nfe``).
    worst_residuals: per sample, the largest relative residual over the steps (None: the
                 solver does not report it per sample); where every sample's is within
                 ``SKIP_CHECK_RESIDUAL``, a deterministic inversion's check does not regenerate
                 (``check_round_trip``: ``round_trip_skipped``): ``round_trip`` stays empty,
                 ``fell_back`` and ``compared`` all False.
    """

    noise: torch.Tensor
    trajectory: list[torch.Tensor]
    sigmas: torch.Tensor
    method: str
    family: str
    nfe: int = 0
    residuals: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    histories: list[tuple[float, ...]] = field(default_factory=list)
    backward_passes: int = 0
    round_trip: list[float] = field(default_factory=list)
    fell_back: list[bool] = field(default_factory=list)
    compared: list[bool] = field(default_factory=list)
    round_trip_calls: int = 0
    worst_residuals: Optional[list[float]] = None
    round_trip_skipped: bool = False

    def summary(self) -> str:
        """One line per step, for node UI text and logs."""
        lines = [f"{self.method} ({self.family}): {self.nfe} model calls, "
                 f"{self.backward_passes} backward passes"]
        for i, (res, it, code) in enumerate(zip(self.residuals, self.iterations, self.codes)):
            s0, s1 = float(self.sigmas[i]), float(self.sigmas[i + 1])
            lines.append(f"step {i + 1}: sigma {s0:.4g} -> {s1:.4g}, {it} it, "
                         f"residual {res:.2e} ({code})")
        if self.round_trip:
            compared = self.compared or [False] * len(self.round_trip)
            kept = ", ".join(f"{100 * e:.2g} %" + (" (naive inversion kept: it reproduced better)" if back else
                                                   " (naive inversion also tried: it reproduced worse)" if tried else "")
                             for e, back, tried in zip(self.round_trip, self.fell_back, compared))
            lines.append(f"round trip (regenerated vs input, relative error per image): {kept}")
        elif self.round_trip_skipped:
            lines.append("round trip not regenerated: every step of every image converged (relative residual "
                         f"within {SKIP_CHECK_RESIDUAL:g}; such inversions never fell below naive inversion, "
                         "docs/benchmark.md)")
        return "\n".join(lines)
