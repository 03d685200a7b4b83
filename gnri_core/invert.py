"""``invert`` and ``reconstruct``: the public contract of the core.

    result = invert(denoise, x0, sigmas, method="gnri", family="eps", **options)
    x = reconstruct(denoise, result.noise, sigmas.flip(0))

``denoise(x, sigma)`` returns D(x, sigma), the x0-prediction in ComfyUI's convention
(EPS/V: x = x0 + sigma*eps; flow: x = (1 - sigma)*x0 + sigma*eps); ``sigma`` is passed
as a per-batch tensor. ``sigmas`` ascend from the clean level (0, or FlipSigmas'
1e-4) to sigma_max.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .ancestral import ancestral_step, check_noise_maps
from .errors import InversionInputError
from .problem import ATOL, FAMILIES, Denoiser, StepProblem, per_sample, rms, to_d
from .result import SKIP_CHECK_RESIDUAL, InversionResult
from .solvers import DEFAULTS, SOLVERS, SolverOptions

FAMILY_ALIASES = {"eps": "eps", "v_prediction": "eps", "v": "eps", "flow": "flow", "const": "flow"}
METHODS = tuple(SOLVERS)


def check_family(family: str) -> str:
    key = str(family).lower()
    if key not in FAMILY_ALIASES:
        raise InversionInputError(
            f"family must be one of {FAMILIES} (or v_prediction/const), got {family!r}")
    return FAMILY_ALIASES[key]


def check_method(method: str) -> str:
    if method not in SOLVERS:
        raise InversionInputError(f"unknown method {method!r}; expected one of {METHODS}")
    return method


def check_latent(x: torch.Tensor, name: str = "latent") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise InversionInputError(f"{name}: must be a tensor of shape (batch, channels, ...)")
    if not torch.isfinite(x).all():
        raise InversionInputError(f"{name}: contains NaN or inf values")


def check_sigmas(sigmas: torch.Tensor, ascending: bool, family: Optional[str] = None) -> torch.Tensor:
    """Validates a 1-D, strictly monotonic, finite, non-negative schedule."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    direction = "ascending" if ascending else "descending"
    if sigmas.numel() < 2:
        raise InversionInputError(f"sigmas must hold at least 2 values (1 step), got {sigmas.numel()}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise InversionInputError("sigmas must be finite and >= 0")
    steps = sigmas.diff() if ascending else -sigmas.diff()
    if not (steps > 0).all():
        raise InversionInputError(
            f"sigmas must be strictly {direction}, got {[round(float(s), 4) for s in sigmas]}")
    if family == "flow" and float(sigmas.max()) > 1.0 + 1e-6:
        raise InversionInputError(f"flow-model sigmas must lie in [0, 1], got max {float(sigmas.max()):.4g}")
    return sigmas


def invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, method: str = "gnri",
           family: str = "eps", callback: Optional[Callable[[dict], None]] = None,
           check_interrupt: Optional[Callable[[], None]] = None,
           noise_maps: Optional[Sequence[Optional[torch.Tensor]]] = None, eta: float = 1.0,
           **options) -> InversionResult:
    """Inverts the deterministic Euler/DDIM sampler from ``x0`` up the ascending ``sigmas``.

    Each step solves r(z) = 0 with ``method`` (ddim, fixed_point, anderson, renoise,
    newton, gnri); ``options`` override that method's :data:`DEFAULTS`
    (see :class:`SolverOptions`). ``callback`` gets a dict per step; ``check_interrupt``
    is called before every model call and may raise to stop.
    With ``noise_maps`` (generation order, see ``ancestral.py``) it inverts Euler-ancestral
    sampling with those frozen maps and ``eta`` instead (``eta`` is that noise amount; the
    paper update's denominator floor is the option ``eta_floor``).
    The option ``round_trip_check`` (gnri's default 0.05; 0: off) then regenerates from the
    result and falls back to ``ddim`` per sample where that reproduces the input better
    (:func:`check_round_trip`); ``callback`` then also gets its steps, marked ``"phase"``,
    and every dict carries ``"total"``, the callbacks expected so far (for progress bars:
    known from the start, except where a deterministic inversion's check falls back).
    """
    method, family = check_method(method), check_family(family)
    check_latent(x0, "x0")
    sigmas = check_sigmas(sigmas, ascending=True, family=family)
    opts = SolverOptions.build(DEFAULTS[method], options)
    steps = len(sigmas) - 1
    if noise_maps is not None:
        check_noise_maps(noise_maps, steps, x0.shape)
    denoise = _with_interrupt(denoise, check_interrupt)
    progress = _Progress(callback, steps * _expected_passes(method, opts, noise_maps, eta))
    result = _invert_steps(denoise, x0, sigmas, method, family, opts, progress.step, noise_maps, eta)
    if opts.round_trip_check > 0:
        result = check_round_trip(denoise, x0, result, opts.round_trip_check, noise_maps, eta, progress,
                                  is_naive=_is_naive(method, opts))
    return result


def _expected_passes(method: str, opts: SolverOptions, noise_maps, eta: float) -> int:
    """Passes over the schedule ``invert`` expects to make: the inversion, the round-trip
    check's regeneration and, on an ancestral inversion (always compared), naive inversion's
    two; a deterministic one adds those only where an image misses the threshold."""
    if opts.round_trip_check <= 0:
        return 1
    return 4 if _always_compared(noise_maps, eta) and not _is_naive(method, opts) else 2


def _is_naive(method: str, opts: SolverOptions) -> bool:
    """One iteration per step is naive inversion itself (solver step 5): nothing to compare with.
    A larger budget that stops early is not (gnri then returns a Newton step)."""
    return method == "ddim" or opts.max_iters == 1


def _always_compared(noise_maps, eta: float) -> bool:
    """An ancestral inversion: its steps are ill-posed, so the check always compares it with ddim."""
    return noise_maps is not None and eta > 0


class _Progress:
    """Numbers the callbacks of the inversion and of the round-trip check in one sequence,
    each with the total expected so far (a deterministic check's fallback to ddim adds to it)."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.done, self.last = callback, total, 0, None

    def step(self, info: dict) -> None:
        if self.callback is not None:
            self.callback(dict(info, i=self.done, total=self.total))
        self.done, self.last = self.done + 1, info

    def finish(self) -> None:
        """The passes expected are not made (the check skipped): the bar ends where it is."""
        self.total = self.done
        if self.callback is not None and self.last is not None:
            self.callback(dict(self.last, i=self.done - 1, total=self.total))

    def phase(self, name: str):
        return lambda info: self.step(dict(info, phase=name))


def _invert_steps(denoise, x0, sigmas, method, family, opts, callback, noise_maps, eta) -> InversionResult:
    """The inversion itself: one ``method`` solve per step, up the ascending ``sigmas``."""
    solver, steps = SOLVERS[method], len(sigmas) - 1
    z = x0.detach().float()
    carry: dict = {}
    residuals = []  # per step, per sample (None: not reported)
    result = InversionResult(noise=z, trajectory=[z], sigmas=sigmas, method=method, family=family)
    grad_mode = torch.enable_grad() if opts.gradient == "autograd" else torch.no_grad()
    with grad_mode:
        for i in range(steps):
            # generation step steps-1-i, from sigmas[i+1] down to sigmas[i] (eta 0: plain Euler)
            ancestral = ancestral_step(float(sigmas[i + 1]), float(sigmas[i]), family,
                                       eta if noise_maps is not None else 0.0)
            noise = None if noise_maps is None else noise_maps[steps - 1 - i]
            target = z if noise is None else (z - ancestral.noise_scale * noise.float()) / ancestral.scale
            problem = StepProblem(denoise, target, ancestral.sigma_down, float(sigmas[i + 1]), family,
                                  model_dtype=x0.dtype, carry=carry, frozen_noise=noise is not None)
            step = solver(problem, opts)
            z = step.z.detach()
            result.trajectory.append(z)
            result.nfe += problem.nfe
            result.residuals.append(step.residual)
            result.iterations.append(step.iterations)
            result.codes.append(step.code)
            result.histories.append(step.history)
            result.backward_passes += step.backward_passes
            residuals.append(step.sample_residuals)
            if callback is not None:
                callback({"i": i, "x": z, "sigma": sigmas[i + 1], "nfe": result.nfe,
                          "iterations": step.iterations, "residual": step.residual})
    result.noise = z
    if residuals and all(r is not None for r in residuals):
        result.worst_residuals = torch.stack(residuals).amax(0).tolist()
    return result


def round_trip_error(denoise: Denoiser, x0: torch.Tensor, result: InversionResult,
                     noise_maps=None, eta: float = 1.0, callback=None) -> torch.Tensor:
    """Per sample, rms(reconstruct(result) - x0) / (ATOL + rms(x0)): what regeneration from the
    inverted noise does (one model call per step)."""
    x = reconstruct(denoise, result.noise.to(x0.dtype), result.sigmas.flip(0), noise_maps=noise_maps, eta=eta,
                    family=result.family, callback=callback)
    return rms(x - x0.float()) / (ATOL + rms(x0.float()))


def check_round_trip(denoise: Denoiser, x0: torch.Tensor, result: InversionResult, threshold: float,
                     noise_maps=None, eta: float = 1.0, progress: Optional[_Progress] = None,
                     is_naive: Optional[bool] = None) -> InversionResult:
    """Judges the inversion by what regeneration does to it, not by its residuals: where a
    sample's round-trip error exceeds ``threshold`` (on an ancestral inversion: always), the
    batch is inverted with ``ddim`` too and each such sample keeps whichever inversion
    reproduces it better. Naive inversion is the floor a solver must not fall below: a step
    solved to a root of another basin (a mode flip) regenerates another image however small
    its residual; ancestral steps are ill-posed, and there naive inversion can beat a round
    trip well within the threshold (docs/benchmark.md).
    ``is_naive``: the result is naive inversion's own (``invert`` knows from its options; default:
    its method is ``ddim``), so nothing is compared.
    A deterministic inversion whose every step converged on every sample (relative residual
    within ``SKIP_CHECK_RESIDUAL``, ``result.worst_residuals``) is not regenerated (``round_trip_skipped``):
    on the mixture beds none of 471 such images had a round trip near the threshold (at most
    0.033) or below naive inversion (docs/benchmark.md); the check is for steps that did not
    converge. (A looser tolerance stops steps earlier, not the check.)
    Sets ``round_trip`` (per sample, of the kept inversion), ``fell_back`` and ``compared``."""
    progress = progress or _Progress(None, 0)
    naive = (result.method == "ddim") if is_naive is None else is_naive
    always = _always_compared(noise_maps, eta)
    if (result.worst_residuals and max(result.worst_residuals) <= SKIP_CHECK_RESIDUAL
            and not always and not naive):
        result.round_trip_skipped = True
        result.fell_back = result.compared = [False] * len(result.worst_residuals)
        progress.finish()
        return result
    error = round_trip_error(denoise, x0, result, noise_maps, eta, progress.phase("round_trip"))
    steps = calls = len(result.sigmas) - 1
    fell_back = torch.zeros_like(error, dtype=torch.bool)
    compared = torch.ones_like(fell_back) if always else error > threshold
    if naive:
        compared = torch.zeros_like(compared)
    if bool(compared.any()):
        progress.total = max(progress.total, progress.done + 2 * steps)
        naive = _invert_steps(denoise, x0, result.sigmas, "ddim", result.family, DEFAULTS["ddim"],
                              progress.phase("ddim"), noise_maps, eta)
        naive_error = round_trip_error(denoise, x0, naive, noise_maps, eta, progress.phase("ddim_round_trip"))
        calls += 2 * steps
        fell_back = compared & (naive_error < error)
        error = torch.where(fell_back, naive_error, error)
        result.trajectory = [torch.where(per_sample(fell_back, ours), theirs, ours)
                             for ours, theirs in zip(result.trajectory, naive.trajectory)]
        result.noise = result.trajectory[-1]
    result.nfe += calls
    result.round_trip, result.fell_back, result.round_trip_calls = error.tolist(), fell_back.tolist(), calls
    result.compared = compared.tolist()
    return result


def reconstruct(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor,
                callback: Optional[Callable[[dict], None]] = None,
                check_interrupt: Optional[Callable[[], None]] = None,
                noise_maps: Optional[Sequence[Optional[torch.Tensor]]] = None, eta: float = 1.0,
                family: str = "eps", trajectory: Optional[Sequence[torch.Tensor]] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic Euler/DDIM sampling down the descending ``sigmas`` (ComfyUI ``euler``);
    with ``noise_maps``, Euler-ancestral with those frozen maps (ComfyUI ``euler_ancestral``).

    With exact inversion roots this returns the inverted x0. With ``trajectory``
    (latents at each of ``sigmas``, e.g. an inversion's trajectory reversed) and
    ``mask`` (1 = edit), every step keeps the trajectory's latent outside the mask
    (TurboEdit, Algorithm 2): the background is preserved exactly.
    """
    check_latent(noise, "noise")
    sigmas = check_sigmas(sigmas, ascending=False)
    family = check_family(family)
    if noise_maps is not None:
        check_noise_maps(noise_maps, len(sigmas) - 1, noise.shape)
    if trajectory is not None:
        check_trajectory(trajectory, mask, len(sigmas), noise.shape)
    denoise = _with_interrupt(denoise, check_interrupt)
    x = noise.detach().float()
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            s_in = torch.full((x.shape[0],), sigma, device=x.device)
            denoised = denoise(x.to(noise.dtype), s_in).float()
            step = ancestral_step(sigma, sigma_next, family, eta if noise_maps is not None else 0.0)
            x = step.scale * (x + (step.sigma_down - sigma) * to_d(x, sigma, denoised))
            if noise_maps is not None and noise_maps[i] is not None:
                x = x + step.noise_scale * noise_maps[i].float()
            if trajectory is not None:
                x = torch.lerp(trajectory[i + 1].to(x.device).float(), x, mask.to(x.device))
            if callback is not None:
                callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


def check_trajectory(trajectory, mask, length: int, shape) -> None:
    """A trajectory to blend with needs one latent per sigma and a broadcastable mask."""
    if len(trajectory) != length:
        raise InversionInputError(f"trajectory: expected {length} latents (one per sigma), got {len(trajectory)}")
    if tuple(trajectory[0].shape) != tuple(shape):
        raise InversionInputError(f"trajectory: latents of shape {tuple(trajectory[0].shape)} do not match "
                                  f"the noise {tuple(shape)}")
    try:
        fits = mask is not None and torch.broadcast_shapes(mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise InversionInputError(f"mask: shape {None if mask is None else tuple(mask.shape)} does not "
                                  f"broadcast to the latent {tuple(shape)}")


def _with_interrupt(denoise: Denoiser, check_interrupt) -> Denoiser:
    if check_interrupt is None:
        return denoise

    def checked(x, sigma):
        check_interrupt()
        return denoise(x, sigma)
    return checked
