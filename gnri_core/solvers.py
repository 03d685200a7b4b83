"""Per-step root finders for r(z) = z - f(z) = 0 (see ``problem.py``).

Every solver is ``solve_x(problem, options) -> StepResult``, starts from
z^0 = z_prev and spends one model call per iteration (K iterations cost exactly K
model calls). Fixed-point, ReNoise and GNRI (paper) return f of their last/best
evaluated iterate; Anderson returns its last mixed iterate (as AIDI does); GNRI
(secant) returns its last Newton step only where a multisecant model produced it and the
last iterate was accepted, else f of its best evaluated iterate.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace

import torch

from . import spectrum
from .autograd import through_inference_tensors
from .errors import InversionError, InversionInputError
from .problem import StepProblem, batch_dot, batch_norm2, converged, per_sample, rms, to_d
from .result import CONVERGED, MAX_ITERS, SINGLE_STEP, StepResult

GRADIENTS = ("detached", "autograd")
GUIDANCE_FORMS = ("euler", "ddim")
UPDATES = ("secant", "paper")
PREDICTORS = ("euler", "none")
JACOBIANS = ("spectral", "scalar")
ANCHORS = ("naive", "forward_mean")
CHOICES = {"gradient": GRADIENTS, "guidance": GUIDANCE_FORMS, "update": UPDATES,
           "jacobian": JACOBIANS, "anchor": ANCHORS, "predictor": PREDICTORS}  # option -> allowed values


@dataclass(frozen=True)
class SolverOptions:
    """Settings shared by the solvers; each solver reads the ones it needs.

    max_iters:        model calls per step (iterations).
    tol:              stop early once every relative residual is below this (0: never); GNRI
                      secant then returns the Newton step from there (no call; step 5).
    extra_iters:      GNRI secant, deterministic steps, ``max_iters`` >= 2: a step whose best
                      relative residual is still above ``extra_tol`` after ``max_iters``
                      iterations keeps iterating, up to this many more (0: a fixed budget).
                      Budget where it is needed: on the trained world models the steps that
                      stay unconverged are few at 20 steps (the top ones: 2.9-3.9 calls/step
                      in all; at 4 steps every step, 7-7.5) and they decide the round trip
                      (world Flux, 20 steps: 25 of 160 scenes below naive inversion with a
                      fixed budget, 0 with this; docs/benchmark.md).
    extra_tol:        the relative residual ``extra_iters`` iterates toward.
    lam:              GNRI guidance weight lambda in F = ||r||_1 + lambda * G and, for the
                      secant update, in its least squares
                      ||r||^2 + lambda rms(r_k)^2 ||z - a||^2 / max(beta, ms(z_k - a))
                      toward the anchor a (``anchor``; up to ``ANCESTRAL_PULL`` times stronger
                      on ancestral steps; see _guidance_weight). 0: unguided.
    eta_floor:        GNRI (paper update) floor eta on |dF/dz_j| in the Newton denominator
                      (not ``eta``: ``invert``'s ``eta`` is the ancestral noise amount).
    gradient:         GNRI dF/dz: "detached" (reference code, model output held
                      constant, dr/dz = I) or "autograd" (through the network).
    guidance:         G = ||z - mu|| ("euler") or ||z - mu|| / beta ("ddim").
    step_control:     GNRI paper update: step from the best iterate and halve the step
                      when the objective did not decrease (False: the plain update).
    update:           GNRI: "secant" (Newton with a secant Jacobian, the default) or
                      "paper" (the scalar update distributed over coordinates).
    window:           Anderson history length m.
    ridge:            Anderson least-squares regularisation (relative to the Gram trace).
    renoise_average:  ReNoise: how many of the last derivative estimates to average.
    contraction:      GNRI secant, from the third iteration on: a sample keeps iterating only
                      while each iteration cut its best relative residual to at most this
                      fraction of the one before; otherwise it keeps the answer it had (a
                      secant model that stopped converging is heading for a root in another
                      basin: a mode flip, docs/benchmark.md). 0: always iterate. Not on
                      ancestral steps (ill-conditioned everywhere: it stopped them too early).
                      Off by default: 0.5 cuts the mixture tails' failures (docs/benchmark.md)
                      but stops smooth models short (a tiny SD3's round trip 1.3e-4 -> 1.0e-3)
                      and caps what a large ``max_iters`` converges to.
    predictor:        GNRI secant, first iterate of a step: "euler" (default) the explicit
                      Euler / native DDIM step z_prev + h (z_prev - D_p) / sigma, with D_p the
                      denoiser output at z_prev estimated by the previous step: its best
                      evaluated D(z_b) plus g (z_prev - z_b), g its measured gain capped at 1
                      (no extra model call; dropped when its residual exceeds its move);
                      "none": z_prev (more robust on the mixture tails before step 5's ratio
                      test, less exact on the real networks, docs/benchmark.md).
    jacobian:         GNRI secant, first Newton step of a step: "spectral" (default) dr/dz
                      diagonal in Fourier space, Gaussian data with the input latent's radially
                      averaged power spectrum (``spectrum.py``; other latent shapes and the
                      step from sigma 0: scalar);
                      "scalar": one slope for every direction (the previous default).
    anchor:           GNRI secant, where the guidance pulls: "naive" (default) the naive
                      inversion step (the Euler predictor, else f(z_prev) once evaluated);
                      "forward_mean": the paper's mean of q(z' | z_prev), on deterministic
                      steps only (the previous default).
    trust_ratio:      GNRI secant, step 5: on deterministic steps, the last Newton step of a
                      model spanning two or more secant differences is returned unevaluated
                      only if the last evaluated Newton step cut the best residual to at most
                      this fraction; otherwise the best evaluated iterate. 0: the previous
                      rule (always the Newton step where a multisecant model exists): more
                      exact on the trained world UNet (4-step round trip median 35.4 dB
                      against 32.4, ``python -m bench recon``), 5x more images below naive
                      inversion on the mixture tails (56 against 10 of 800, docs/benchmark.md).
    round_trip_check: not a step setting: ``invert`` regenerates from its answer (one model call
                      per step) and, where a sample's relative round-trip error
                      rms(x - x0) / (ATOL + rms(x0)) exceeds this (ancestral inversions: always),
                      inverts the batch with ddim too (two calls per step) and keeps per sample
                      whichever reproduces the input better (``invert.check_round_trip``).
                      0: off (every method but gnri).
                      Measured (docs/benchmark.md): the mixture tails' images below naive
                      inversion 5 -> 0 of 400 (iso), ancestral 5 / 16 -> 0 of 160, real photos
                      4 -> 0 of 400; on the trained world models it never fell back.
    flip_ratio:       GNRI secant, step 5, deterministic steps: an evaluated iterate whose
                      denoised image D(z, sigma') lies more than this many times as far from the
                      input latent as the nearest one of the step's iterates is a mode flip
                      (regeneration from it heads for another image) and is never returned.
                      0: off (the previous rule).
    """

    max_iters: int = 2
    tol: float = 1e-4
    extra_iters: int = 0
    extra_tol: float = 1e-3
    lam: float = 0.3
    eta_floor: float = 1e-3
    gradient: str = "detached"
    guidance: str = "euler"
    step_control: bool = True
    update: str = "secant"
    window: int = 3
    ridge: float = 1e-6
    renoise_average: int = 3
    predictor: str = "euler"
    contraction: float = 0.0
    trust_ratio: float = 0.3
    jacobian: str = "spectral"
    anchor: str = "naive"
    flip_ratio: float = 1.75
    round_trip_check: float = 0.0

    def validated(self) -> "SolverOptions":
        if int(self.max_iters) < 1:
            raise InversionInputError(f"max_iters must be >= 1, got {self.max_iters}")
        if int(self.extra_iters) < 0 or not self.extra_tol >= 0:
            raise InversionInputError(f"extra_iters and extra_tol must be >= 0, got extra_iters="
                                      f"{self.extra_iters}, extra_tol={self.extra_tol}")
        if not self.round_trip_check >= 0:
            raise InversionInputError(f"round_trip_check must be >= 0 (0: off), got {self.round_trip_check}")
        if min(self.tol, self.lam, self.eta_floor, self.contraction, self.trust_ratio) < 0:
            raise InversionInputError(
                f"tol, lam, eta_floor, contraction and trust_ratio must be >= 0, got tol={self.tol}, "
                f"lam={self.lam}, eta_floor={self.eta_floor}, contraction={self.contraction}, "
                f"trust_ratio={self.trust_ratio}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InversionInputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.flip_ratio != 0 and not self.flip_ratio >= 1:
            raise InversionInputError(f"flip_ratio must be 0 (off) or >= 1, got {self.flip_ratio}")
        if int(self.window) < 1 or int(self.renoise_average) < 1:
            raise InversionInputError("window and renoise_average must be >= 1")
        return self

    @classmethod
    def build(cls, base: "SolverOptions", overrides: dict) -> "SolverOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InversionInputError(
                f"unknown option(s) {unknown}; expected some of {sorted(names)}")
        return replace(base, **overrides).validated()


def _result(z, history, nfe, tol) -> StepResult:
    residual = history[-1]
    code = CONVERGED if tol > 0 and residual <= tol else MAX_ITERS
    return StepResult(z=z, iterations=len(history), nfe=nfe, residual=residual,
                      code=code, history=tuple(history))


def solve_ddim(p: StepProblem, o: SolverOptions) -> StepResult:
    """Naive DDIM inversion: z = f(z_prev), the model evaluated at z_prev (1 call)."""
    z = p.fixed_point_map(p.z_prev)
    residual = float(p.relative(p.z_prev - z).max())
    return StepResult(z=z, iterations=1, nfe=1, residual=residual, code=SINGLE_STEP,
                      history=(residual,))


def solve_fixed_point(p: StepProblem, o: SolverOptions) -> StepResult:
    """Fixed-point iteration z <- f(z) (Meiri et al.; AIDI-E without averaging)."""
    z, history = p.z_prev, []
    for _ in range(o.max_iters):
        fz = p.fixed_point_map(z)
        relative = p.relative(z - fz)
        history.append(float(relative.max()))
        z = fz
        if converged(relative, o.tol):
            break
    return _result(z, history, len(history), o.tol)


def solve_anderson(p: StepProblem, o: SolverOptions) -> StepResult:
    """Anderson acceleration of z <- f(z) (AIDI-A), type II, window m, ridge-regularised.

    With g_k = f(z_k) - z_k and differences dG, dZ over the last m iterates:
    gamma = argmin ||g_k - dG gamma||, z_{k+1} = z_k + g_k - (dZ + dG) gamma.
    """
    z, history, zs, gs = p.z_prev, [], [], []
    for _ in range(o.max_iters):
        fz = p.fixed_point_map(z)
        g = fz - z
        relative = p.relative(g)
        history.append(float(relative.max()))
        zs, gs = (zs + [z])[-(o.window + 1):], (gs + [g])[-(o.window + 1):]
        if converged(relative, o.tol) or len(gs) == 1:
            z = fz
            if converged(relative, o.tol):
                break
            continue
        z = multisecant_step(zs, gs, o.ridge)
    return _result(z, history, len(history), o.tol)


def multisecant_step(zs: list, gs: list, ridge: float, valid=None, pull=None) -> torch.Tensor:
    """Anderson type-II mixing = multisecant quasi-Newton step for g(z) = f(z) - z = 0.

    With differences dG, dZ over the history and M = dZ + dG, the step
    z_{k+1} = z_k + g_k - M gamma takes the gamma that minimises

        ||g_k - dG gamma||^2 + w ||z_{k+1} - mu||^2 + ridge * tr * ||gamma||^2,

    the secant model of ||r(z_{k+1})||^2 plus, with ``pull = (mu, w)`` (w per sample),
    the GNRI guidance toward the forward-process mean. The small normal equations are
    solved in float64 by a rank-aware pseudo-inverse (eigenvalues below 1e-12 of the
    largest dropped), so collinear or zero differences cannot raise; a sample whose step
    is not finite takes the fixed-point step z + g. Per batch element; ``valid`` (B,)
    counts the usable latest history entries of each element (older differences are
    ignored; with none left the step is z + g, the fixed-point step).
    """
    z, g = zs[-1], gs[-1]
    fixed_point = z + g
    if len(zs) < 2:
        return fixed_point
    d_g = torch.stack([(b - a).flatten(1) for a, b in zip(gs, gs[1:])], dim=2).double()  # (B, N, m)
    d_z = torch.stack([(b - a).flatten(1) for a, b in zip(zs, zs[1:])], dim=2).double()
    if valid is not None:
        columns = torch.arange(d_g.shape[2], device=d_g.device)
        usable = (columns >= d_g.shape[2] - (valid - 1).clamp_min(0).view(-1, 1)).to(d_g.dtype)
        d_g, d_z = d_g * usable.unsqueeze(1), d_z * usable.unsqueeze(1)
    move = d_z + d_g
    lhs = d_g.transpose(1, 2) @ d_g
    rhs = d_g.transpose(1, 2) @ g.flatten(1).double().unsqueeze(2)
    if pull is not None:
        mu, weight = pull
        w = weight.double().view(-1, 1, 1)
        lhs = lhs + w * (move.transpose(1, 2) @ move)
        rhs = rhs + w * (move.transpose(1, 2) @ (fixed_point - mu).flatten(1).double().unsqueeze(2))
    lhs = lhs + ridge * lhs.diagonal(dim1=1, dim2=2).sum(1).view(-1, 1, 1) * torch.eye(
        lhs.shape[1], dtype=lhs.dtype, device=lhs.device)
    gamma = _psd_solve(lhs, rhs)
    step = fixed_point - (move @ gamma).view_as(z).to(z.dtype)
    ok = torch.isfinite(step).flatten(1).all(1)
    return torch.where(per_sample(ok, z), step, fixed_point)


def _psd_solve(lhs: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-12) -> torch.Tensor:
    """Minimum-norm solution of lhs x = rhs for symmetric PSD (B, m, m) lhs (pseudo-inverse);
    non-finite systems give x = 0."""
    finite = torch.isfinite(lhs).flatten(1).all(1) & torch.isfinite(rhs).flatten(1).all(1)
    lhs = torch.where(per_sample(finite, lhs), lhs, torch.zeros_like(lhs))
    rhs = torch.where(per_sample(finite, rhs), rhs, torch.zeros_like(rhs))
    values, vectors = torch.linalg.eigh(lhs)
    keep = values > rcond * values.abs().amax(1, keepdim=True).clamp_min(1e-300)
    inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
    return vectors @ (inverse.unsqueeze(2) * (vectors.transpose(1, 2) @ rhs))


def solve_renoise(p: StepProblem, o: SolverOptions) -> StepResult:
    """ReNoise (Garibi et al.): fixed-point iterations, then one step with the
    average of the last ``renoise_average`` derivative estimates."""
    z, history, ds = p.z_prev, [], []
    for _ in range(o.max_iters):
        d = to_d(z, p.sigma_next, p.denoised(z))
        fz = p.z_prev + p.h * d
        relative = p.relative(z - fz)
        history.append(float(relative.max()))
        ds.append(d)
        z = fz
        if converged(relative, o.tol):
            break
    z = p.z_prev + p.h * torch.stack(ds[-o.renoise_average:]).mean(0)
    return _result(z, history, len(history), o.tol)


def _guidance(p: StepProblem, o: SolverOptions):
    """mu and the factor of G: ||z - mu|| ("euler") or ||z - mu|| / beta ("ddim")."""
    mu, beta = p.guidance_mean_var()
    return mu, (1.0 / beta if o.guidance == "ddim" else 1.0)


def _guided_objective(o: SolverOptions, z, r, mu, g_scale) -> torch.Tensor:
    """The GNRI objective F = ||r||_1 + lambda * G(z) per sample."""
    return r.abs().flatten(1).sum(1) + o.lam * g_scale * batch_norm2(z - mu)


def _objective_and_gradient(p: StepProblem, o: SolverOptions, z, mu, g_scale):
    """F(z) = ||r(z)||_1 + lambda * G(z) per sample, dF/dz, r(z) and f(z)."""
    if o.gradient == "autograd":
        with through_inference_tensors():
            z_var = z.detach().clone().requires_grad_(True)
            fz = p.fixed_point_map(z_var)
            r = z_var - fz
            objective = _guided_objective(o, z_var, r, mu, g_scale)
            try:
                (grad,) = torch.autograd.grad(objective.sum(), z_var)
            except RuntimeError as exc:  # e.g. a model implementation with in-place ops
                raise InversionError(
                    "gradient='autograd': this model cannot be differentiated through "
                    f"({str(exc).splitlines()[0]}); use the detached gradient or the "
                    "secant update") from exc
        return objective.detach(), grad.detach(), r.detach(), fz.detach()
    fz = p.fixed_point_map(z)
    r = z - fz
    offset = z - mu
    objective = _guided_objective(o, z, r, mu, g_scale)
    grad = torch.sign(r) + o.lam * g_scale * offset / per_sample(batch_norm2(offset).clamp_min(1e-12), z)
    return objective, grad, r, fz


def solve_gnri(p: StepProblem, o: SolverOptions) -> StepResult:
    """Guided Newton-Raphson inversion (Samuel et al.); ``o.update`` picks the update."""
    return (solve_gnri_secant if o.update == "secant" else solve_gnri_paper)(p, o)


NONMONOTONE = 10.0  # GNRI secant keeps iterating from iterates with F < 10 * F_best
GUIDE_RADIUS = 3.0  # ... and trusts an unevaluated step within 3 sqrt(beta D) of mu
ANCESTRAL_PULL = 100.0  # ... pulls up to 100x harder on ancestral steps (ill-posed: dr/dz ~ rho = sigma_down / sigma'):
ANCESTRAL_PULL_CURVATURE = 0.1  # ... 0.1 / rho^2 times, rho^2 the residual's curvature on noise directions
ANCESTRAL_FADE = 0.3  # ... for two iterations, then 0.3x per iteration, within a budget of
ANCESTRAL_BUDGET = 4  # ... up to 4 iterations; larger budgets aim at the exact root:
ANCESTRAL_FADE_LARGE_BUDGET = 0.1  # ... 0.1x per iteration from the first
FLIP_MAX_RESIDUAL = 0.05  # the mode-flip guard judges steps whose best relative residual is below this
FLIP_RESIDUAL_RATIO = 3.0  # ... and swaps in an iterate at most 3x that residual


class BestSoFar:
    """Per sample, the evaluated iterate with the lowest objective F, its f(z), relative
    residual and any extra tensors (the solvers' shared "keep the best iterate")."""

    def __init__(self, z_prev: torch.Tensor):
        batch = z_prev.shape[0]
        self.objective = torch.full((batch,), float("inf"), device=z_prev.device)
        self.relative = self.objective.clone()
        self.z = self.fz = z_prev
        self.extra: dict = {}

    def update(self, objective, relative, z, fz, allowed=None, **extra) -> torch.Tensor:
        """Keeps (z, fz, extra) where ``objective`` improves (and ``allowed``); returns that mask."""
        improved = objective < self.objective
        if allowed is not None:
            improved = improved & allowed
        keep = per_sample(improved, z)
        self.objective = torch.where(improved, objective, self.objective)
        self.relative = torch.where(improved, relative, self.relative)
        self.z, self.fz = torch.where(keep, z, self.z), torch.where(keep, fz, self.fz)
        for key, value in extra.items():
            self.extra[key] = torch.where(keep, value, self.extra[key]) if key in self.extra else value
        return improved

    def copy(self) -> "BestSoFar":
        other = copy.copy(self)
        other.extra = dict(self.extra)
        return other

    def take(self, other: "BestSoFar", where: torch.Tensor) -> None:
        """Replaces this record by ``other``'s in the samples ``where`` is True."""
        keep = per_sample(where, self.z)
        self.objective = torch.where(where, other.objective, self.objective)
        self.relative = torch.where(where, other.relative, self.relative)
        self.z, self.fz = torch.where(keep, other.z, self.z), torch.where(keep, other.fz, self.fz)
        self.extra = {key: torch.where(keep, other.extra[key], value) for key, value in self.extra.items()}


def _unflipped(best: BestSoFar, evaluated: list, ratio: float, z_prev: torch.Tensor) -> torch.Tensor:
    """Step 5's mode-flip guard: the best of the ``evaluated`` iterates (objective, relative,
    z, f(z), D(z), drift) whose drift ||D(z) - input|| is within ``ratio`` times the
    smallest replaces ``best`` where best drifted further, had converged to
    ``FLIP_MAX_RESIDUAL`` and the replacement's residual is within ``FLIP_RESIDUAL_RATIO``
    times its own. Returns where it did."""
    drift = torch.stack([e[5] for e in evaluated])
    near = drift <= ratio * drift.min(0).values
    unflipped = BestSoFar(z_prev)
    for (objective, relative, z, fz, denoised, _), allowed in zip(evaluated, near):
        unflipped.update(objective, relative, z, fz, allowed=allowed, denoised=denoised)
    flipped = (torch.isfinite(unflipped.objective) & (unflipped.objective > best.objective)
               & (best.relative <= FLIP_MAX_RESIDUAL)
               & (unflipped.relative <= FLIP_RESIDUAL_RATIO * best.relative))
    best.take(unflipped, flipped)
    return flipped


def _spectral_slope(p: StepProblem):
    """dr/dz per Fourier mode (``spectrum.py``) for the latent's data power spectrum, estimated
    on the first step from z_prev with its noise removed and carried; None for latents that
    are not images or videos, and on a step from sigma = 0 (it solves D(z, sigma') = x0, whose
    weak modes the model's gain would amplify up to 100x into the noise: measured to make
    masked Flux edits fail more often, docs/benchmark.md)."""
    if not spectrum.supported(p.z_prev):
        return None
    power = p.carry.get("data_power")  # carry lives for one inversion: one batch
    if power is None:
        power = p.carry["data_power"] = p.clean_power(spectrum.radial_power(p.z_prev))
    return None if p.sigma == 0 else p.gaussian_slope(power)


def solve_gnri_secant(p: StepProblem, o: SolverOptions) -> StepResult:
    """GNRI with a secant Jacobian (the default). K iterations = K model calls (plus step 7's):

    1. Start from the explicit Euler (native DDIM) step z_prev + h (z_prev - D_p) / sigma,
       D_p = D(z_prev, sigma) estimated by the previous step (no call; first step, one
       iteration or ``predictor="none"``: z_prev). [Euler/DDIM predictor, as in predictor-corrector ODE
       solvers.]
    2. Evaluate r(z) = z - f(z) (one call) and the GNRI objective F = ||r||_1 + lambda G(z),
       G = ||z - a|| (/ beta) with a the anchor of step 4. [Samuel et al., GNRI.] Keep the
       best evaluated iterate.
    3. Safeguard: the predictor is rejected where its residual exceeds its move; an iterate
       with F > ``NONMONOTONE`` F_best is rejected and its sample restarts from the best
       iterate with the fixed-point step, halved per rejection in a row. [Non-monotone line
       search, Grippo-Lampariello-Lucidi 1986; fixed-point step of Meiri et al./AIDI.]
    4. Newton step z - J^-1 r with J = dr/dz = (sigma/sigma') I + (h/sigma') dD/dz:
       first J from Gaussian data (``denoiser_gain``): per Fourier mode with the latent's
       own power spectrum (``jacobian="spectral"``, ``spectrum.py``: about 1 on the image's
       strong low frequencies, sigma/sigma' on its weak high ones) or one slope a I carried
       from the previous step; once two iterates exist, the multisecant (Anderson type-II)
       step (``multisecant_step``). Both minimise the linear model of ||r||^2 plus the
       guidance term w ||z - a||^2, w = lambda rms(r_k)^2 / max(beta, ms(z_k - a)): a pull
       that fades as the residual r_k vanishes (the root stays exact) and never outweighs
       the residual (ms: mean square). Its anchor a (``anchor="naive"``) is naive
       inversion's answer: the Euler predictor of step 1, else f(z_prev) once evaluated; so
       directions the residual barely determines stay where naive inversion put them
       (``"forward_mean"``: the paper's mu, deterministic steps only). On ancestral steps,
       ill-posed (dr/dz ~ rho = sigma_down/sigma' on noise directions), the pull is
       min(``ANCESTRAL_PULL``, ``ANCESTRAL_PULL_CURVATURE`` / rho^2) times stronger (100x on
       few-step schedules, below 1x at 20 steps) for two iterations, then fades by ``ANCESTRAL_FADE``
       per iteration; budgets above ``ANCESTRAL_BUDGET`` iterations aim at the exact root and
       fade it by ``ANCESTRAL_FADE_LARGE_BUDGET`` per iteration from the first.
       [Newton-Raphson; Wiener filter; Anderson 1965 / Fang-Saad multisecant; GNRI guidance;
       Levenberg-Marquardt damping that vanishes with the residual.] The slope carried to the
       next step is |dr|^2 / <dr, dz> [Barzilai-Borwein, second form], within ``slope_bounds``.
    5. Return the last Newton step, unevaluated, only where the model behind it has earned
       trust: it came from the multisecant model (two evaluated iterates), the last iterate
       was accepted, the step lies within ``GUIDE_RADIUS`` sqrt(beta D) of mu (where
       q(z' | z_prev) = N(mu, beta) has its mass) and, on deterministic steps where the
       model spans two or more secant differences, the last evaluated Newton step cut the
       best residual to at most ``trust_ratio`` of what it was [the ratio test of
       trust-region methods: a model that just predicted well].
       Otherwise return the best evaluated iterate z_best, whose residual is known [the
       reference code's "best iterate"; an unevaluated step of a model that mispredicts is
       where the mode flips of docs/benchmark.md came from], or f(z_best) where z_best is
       the start z_prev itself and on ancestral steps (frozen noise maps: measured better
       there). So one iteration is the fixed-point step from the evaluated start: exactly
       naive DDIM inversion.
       A step whose every residual reached ``tol`` stops with step 4's Newton step from there
       (no call), judged by this rule; that close to the root the first Newton step (the
       spectral or scalar model) is trusted too. [Newton's local quadratic convergence: one
       more step at no cost. Measured: about 10x more exact at the tolerance, so the
       default stops at 1e-3 instead of 1e-4, on the trained world models at 20 and 50 steps
       a call per step earlier at the same medians, docs/benchmark.md.]
       Mode-flip guard (deterministic steps, ``flip_ratio``): z_best is taken only among the
       evaluated iterates whose denoised image D(z, sigma') lies within ``flip_ratio`` times
       the smallest such distance to the input latent, where the step converged to
       ``FLIP_MAX_RESIDUAL`` and such an iterate's residual is within ``FLIP_RESIDUAL_RATIO``
       times the best; where that excludes the lowest-F iterate, the unevaluated step is
       not returned either. [D is the image regeneration heads for. Measured: on the iso
       mixture's failures the lowest-residual iterate's D lies 1.5-2x as far from the input as
       its neighbours' and regenerates another photo; on the world Flux model's unconverged
       steps with residuals near 0.1 and above D's distance does not tell, docs/benchmark.md.]
    6. Budget where it converges: after the second iteration, a sample whose best residual
       did not fall to ``contraction`` times the previous one stops with the answer of step 5
       at that point; the step ends when every sample stopped. [Superlinear convergence
       test of quasi-Newton methods; the mode flips of a budget chased past it.]
    7. Budget where it is needed: on deterministic steps, a step whose best residual is still
       above ``extra_tol`` after the K iterations continues, up to ``extra_iters`` more;
       each sample keeps step 5's answer from the iteration where it got below (``EndedEarly``:
       its result does not depend on its batch). [Optimistix's rtol and max_steps:
       iterate to a tolerance within a cap. Measured: the unconverged steps are few and
       decide the round trip (the world Flux's top steps at 20 steps); on ancestral steps
       more iterations made the trained world UNet's round trips worse, docs/benchmark.md.]
    """
    mu, g_scale = _guidance(p, o)
    _, beta = p.guidance_mean_var()
    low, high = p.slope_bounds()
    slope, spectral = _prior_slope(p), (_spectral_slope(p) if o.jacobian == "spectral" else None)
    batch, device = p.z_prev.shape[0], p.z_prev.device
    best = BestSoFar(p.z_prev)
    damping = torch.ones(batch, device=device)  # restart step length, halved per rejection in a row
    valid = torch.zeros(batch, dtype=torch.long, device=device)
    zs, gs, history = [], [], []
    z = _euler_predictor(p, o)  # step 1
    predicted = z is not None
    anchor = z if predicted and o.anchor == "naive" else mu  # where the guidance pulls (step 4)
    z = z if predicted else p.z_prev
    ended = EndedEarly(best, slope)  # samples whose step ended before the batch's (steps 6 and 7)
    before = None  # the best residual before the latest evaluation
    evaluated = []  # the iterates step 5's mode-flip guard judges (deterministic steps only)
    guard = o.flip_ratio > 0 and not p.frozen_noise
    source = p.carry.setdefault("input_latent", p.z_prev)  # the latent being inverted

    def finish(converged_now=False):  # step 5 on the current state
        return _finish(p, o, best, before, z, accepted, valid, evaluated, converged_now)

    stop = False
    for iteration in range(o.max_iters + _extra_budget(p, o)):
        if iteration >= o.max_iters:  # step 7: past the budget, only unconverged samples go on
            below = best.relative <= o.extra_tol if o.extra_tol > 0 else torch.zeros_like(ended.done)
            ended.end(below, finish, slope)
            if bool(ended.done.all()):
                break
        if iteration > 0:
            before = best.relative.clone()
        denoised = p.denoised(z)  # step 2
        fz = p.fixed_point_map(z, denoised)
        r = z - fz
        if iteration == 0 and not predicted and o.anchor == "naive":
            anchor = fz  # naive inversion's answer f(z_prev)
        objective = _guided_objective(o, z, r, anchor, g_scale)
        relative = p.relative(r)
        # step 3: the predictor moved z_prev by about r(z_prev); a larger residual made things worse
        reject = (batch_norm2(r) > batch_norm2(z - p.z_prev)) if predicted and iteration == 0 else (
            torch.zeros(batch, dtype=torch.bool, device=device))
        accepted = (objective < best.objective * NONMONOTONE) & ~reject
        improved = best.update(objective, relative, z, fz, allowed=~reject, denoised=denoised)
        if guard:  # step 5's mode-flip guard: how far the image z heads for lies from the input
            drift = rms(denoised - source)
            evaluated.append((objective.masked_fill(reject, float("inf")), relative, z, fz, denoised, drift))
        history.append(float(torch.where(reject, relative, best.relative).max()))
        stop = converged(best.relative, o.tol)  # step 5 still takes the Newton step below (no call)
        zs, gs = (zs + [z])[-(o.window + 1):], (gs + [-r])[-(o.window + 1):]  # step 4
        valid = (valid + 1).clamp_max(len(zs))
        weight = _guidance_weight(p, o, iteration, r, z, anchor, beta)
        newton = torch.where(per_sample(valid > 1, z), multisecant_step(zs, gs, o.ridge, valid, (anchor, weight)),
                             _first_newton_step(z, r, anchor, weight, slope, spectral))
        if len(zs) > 1:  # the secant slope along the last step, for the next sigma's prior
            slope = torch.where(valid > 1, _secant_slope(zs, gs).clamp(low, high), slope)
        restart = best.z + per_sample(damping, z) * (best.fz - best.z)  # a rejected predictor: z_prev
        z = torch.where(per_sample(accepted, z), newton, restart)
        if stop:
            break
        damping = torch.where(improved, 1.0, torch.where(accepted, damping, 0.5 * damping))
        valid = torch.where(accepted, valid, 0)
        slope = torch.where(accepted | reject, slope, torch.ones_like(slope))  # after a restart: safe step
        if o.contraction > 0 and not p.frozen_noise and before is not None:  # step 6
            stalled = best.relative > o.contraction * before
            ended.end(stalled, finish, slope)
            if bool(ended.done.all()):
                break
    z, best, slope = ended.merge(*finish(stop and o.max_iters >= 2), slope)  # 1 iteration: naive inversion
    p.carry["data_variance"] = p.data_variance(p.gain(slope))
    # D at the returned latent, to first order from the best evaluated iterate (gain capped at 1)
    denoised_at_z = best.extra["denoised"] + per_sample(p.gain(slope).clamp(0.0, 1.0), z) * (z - best.z)
    p.carry["last_eval"] = {"sigma": p.sigma_next, "denoised": denoised_at_z}
    # with step 7's budget the step iterates toward extra_tol: reaching it is converging
    tol = max(o.tol, o.extra_tol) if _extra_budget(p, o) > 0 else o.tol
    return replace(_result(z, history, len(history), tol), sample_residuals=best.relative)


class EndedEarly:
    """Per sample, the answer of a step that ended before its batch's (steps 6 and 7), with
    the best iterate and slope the next step reads: a sample's result does not depend on
    which batch it is in."""

    def __init__(self, best: BestSoFar, slope: torch.Tensor):
        self.done = torch.zeros_like(best.objective, dtype=torch.bool)
        self.z, self.best, self.slope = best.z, None, slope

    def end(self, where, finish, slope) -> None:
        """Ends the samples ``where`` with ``finish()``'s (answer, best iterate), computed only
        if some sample ends now."""
        where = where & ~self.done
        if not bool(where.any()):
            return
        z, best = finish()
        self.z = torch.where(per_sample(where, z), z, self.z)
        if self.best is None:
            self.best = best  # a copy (``_finish``); only its ``where`` samples are ever read
        else:
            self.best.take(best, where)
        self.slope = torch.where(where, slope, self.slope)
        self.done = self.done | where

    def merge(self, z, best: BestSoFar, slope):
        """(z, best, slope) of the whole batch, the ended samples' own where they ended."""
        if self.best is not None:
            best.take(self.best, self.done)
        return (torch.where(per_sample(self.done, z), self.z, z), best,
                torch.where(self.done, self.slope, slope))


def _finish(p: StepProblem, o: SolverOptions, best: BestSoFar, before, z, accepted, valid, evaluated,
            converged_now: bool = False):
    """Step 5 on the current state, leaving it as it is: (the answer, the best iterate after the
    mode-flip guard)."""
    best = best.copy()
    if len(evaluated) > 1:  # the guard recorded the iterates: a flipped step does not trust its model
        accepted = accepted & ~_unflipped(best, evaluated, o.flip_ratio, p.z_prev)
    return _answer(p, o, best, before, z, accepted, valid, converged_now), best


def _extra_budget(p: StepProblem, o: SolverOptions) -> int:
    """Step 7: how many iterations past ``max_iters`` an unconverged step may take (none on
    ancestral steps, and none with one iteration: that stays naive inversion)."""
    return int(o.extra_iters) if o.max_iters >= 2 and not p.frozen_noise else 0


def _prior_slope(p: StepProblem) -> torch.Tensor:
    """Step 4's scalar slope a: dr/dz for Gaussian data of the variance the previous step
    measured (first step: the latent's own second moment), within ``slope_bounds``."""
    variance = p.carry.get("data_variance")
    if variance is None:
        variance = p.z_prev.flatten(1).pow(2).mean(1)
    return p.gaussian_slope(variance)


def _euler_predictor(p: StepProblem, o: SolverOptions):
    """Step 1: z_prev + h (z_prev - D_p) / sigma with D_p = D(z_prev, sigma) as the previous
    step estimated it (no model call); None on the first step, with one iteration or
    ``predictor="none"``."""
    last = p.carry.get("last_eval")
    if (o.predictor != "euler" or o.max_iters < 2 or last is None
            or not abs(last["sigma"] - p.sigma) <= 1e-6 * max(1.0, p.sigma)):
        return None
    return p.z_prev + p.h * (p.z_prev - last["denoised"]) / p.sigma


def _guidance_weight(p: StepProblem, o: SolverOptions, iteration: int, r, z, anchor, beta: float):
    """Step 4's w = lambda rms(r)^2 / max(beta, ms(z - a)): fades as r -> 0 (the root stays
    exact) and never outweighs ||r||^2. On ancestral steps, whose slope on noise directions
    is rho = sigma_down / sigma', stronger toward naive inversion's answer by
    ``ANCESTRAL_PULL_CURVATURE`` / rho^2, at most ``ANCESTRAL_PULL`` (100x up to rho 0.03,
    the few-step schedules; 0.3x at rho 0.6, 20 steps), fading after two iterations
    (budgets above ``ANCESTRAL_BUDGET``: from the first); toward the forward mean there, a
    tiny EPS model's 8-iteration inversion diverged, so that anchor has no pull."""
    lam = o.lam
    if p.frozen_noise:
        fade = (ANCESTRAL_FADE ** max(0, iteration - 1) if o.max_iters <= ANCESTRAL_BUDGET
                else ANCESTRAL_FADE_LARGE_BUDGET ** iteration)
        rho = max(p.sigma / p.sigma_next, 1e-6)
        pull = min(ANCESTRAL_PULL, ANCESTRAL_PULL_CURVATURE / rho ** 2)
        lam = o.lam * pull * fade if o.anchor == "naive" else 0.0
    return lam * rms(r).pow(2) / rms(z - anchor).pow(2).clamp_min(max(beta, 1e-12))


def _first_newton_step(z, r, anchor, weight, slope, spectral):
    """Step 4 before a secant model exists: the guided Newton step
    argmin ||r + J (z' - z)||^2 + w ||z' - a||^2 with J = a I (``slope``) or J diagonal per
    Fourier mode (``spectral``)."""
    if spectral is None:
        return z - (per_sample(slope, z) * r + per_sample(weight, z) * (z - anchor)) / per_sample(
            slope ** 2 + weight, z)
    w = weight.view(-1, *([1] * (spectral.ndim - 1)))
    return z - spectrum.apply(spectral / (spectral ** 2 + w), r) - spectrum.apply(w / (spectral ** 2 + w), z - anchor)


def _secant_slope(zs: list, gs: list) -> torch.Tensor:
    """|dr|^2 / <dr, dz> along the last step [Barzilai-Borwein, second form]."""
    d_z, d_r = zs[-1] - zs[-2], gs[-2] - gs[-1]
    return batch_dot(d_r, d_r) / batch_dot(d_r, d_z).clamp_min(1e-30)


def _answer(p: StepProblem, o: SolverOptions, best: BestSoFar, before, z, accepted, valid,
            converged_now: bool = False) -> torch.Tensor:
    """Step 5: the unevaluated Newton step z where its model earned trust, else z_best (or
    f(z_best) where z_best is z_prev, and on ancestral steps)."""
    mu, beta = p.guidance_mean_var()
    plausible = batch_norm2(z - mu) <= GUIDE_RADIUS * (beta * p.z_prev[0].numel()) ** 0.5
    # a secant model, measured along a real step; or any model, from a residual within tol
    trusted = accepted & plausible & ((valid > 1) | converged_now)
    if p.frozen_noise or o.trust_ratio == 0:
        return torch.where(per_sample(trusted, z), z, best.fz)
    # one secant difference: trusted as before; a wider model must just have predicted well
    proven = valid <= 2
    if before is not None:
        proven = proven | (best.relative <= o.trust_ratio * before)
    at_start = (best.z - p.z_prev).flatten(1).abs().amax(1) == 0
    fallback = torch.where(per_sample(at_start, z), best.fz, best.z)
    return torch.where(per_sample(trusted & proven, z), z, fallback)


def solve_gnri_paper(p: StepProblem, o: SolverOptions) -> StepResult:
    """Guided Newton-Raphson as the paper writes it, on the scalar objective

        F(z) = ||r(z)||_1 + lambda * G(z),  G = ||z - mu|| (/ beta in the DDIM form)

    with the Newton update distributed over the D coordinates,

        z_j <- z_j - (1/D) * F(z) / (dF/dz_j + eta),

    where eta (``eta_floor``) keeps the sign of dF/dz_j (a floor on the denominator).
    Returns f(z_best), z_best the iterate with the lowest F (as the reference code does).
    With step control the step restarts from the best iterate and halves whenever
    F did not decrease.
    """
    mu, g_scale = _guidance(p, o)
    dim = p.z_prev[0].numel()
    best = BestSoFar(p.z_prev)
    step_scale = torch.ones(p.z_prev.shape[0], device=p.z_prev.device)
    z, history = p.z_prev, []
    for _ in range(o.max_iters):
        objective, grad, r, fz = _objective_and_gradient(p, o, z, mu, g_scale)
        improved = best.update(objective, p.relative(r), z, fz, grad=grad)
        history.append(float(best.relative.max()))
        if converged(best.relative, o.tol):
            break
        if o.step_control:
            step_scale = torch.where(improved, step_scale, 0.5 * step_scale)
            z0, f0, g0 = best.z, best.objective, best.extra["grad"]
        else:
            z0, f0, g0 = z, objective, grad
        denominator = g0 + o.eta_floor * torch.where(g0 >= 0, 1.0, -1.0)
        z = z0 - per_sample(step_scale * f0 / dim, z0) / denominator
    result = _result(best.fz, history, len(history), o.tol)
    return replace(result, backward_passes=len(history) if o.gradient == "autograd" else 0)


def solve_newton(p: StepProblem, o: SolverOptions) -> StepResult:
    """Unguided Newton-Raphson: GNRI with lambda = 0 (F = ||r||_1)."""
    return solve_gnri(p, replace(o, lam=0.0))


SOLVERS = {
    "ddim": solve_ddim,
    "fixed_point": solve_fixed_point,
    "anderson": solve_anderson,
    "renoise": solve_renoise,
    "newton": solve_newton,
    "gnri": solve_gnri,
}

# Per-method defaults (max_iters is the model-call budget per step).
DEFAULTS = {
    "ddim": SolverOptions(max_iters=1),
    "fixed_point": SolverOptions(max_iters=10),
    "anderson": SolverOptions(max_iters=10),
    "renoise": SolverOptions(max_iters=9),
    "newton": SolverOptions(max_iters=2),
    "gnri": SolverOptions(max_iters=3, tol=1e-3, extra_iters=5, round_trip_check=0.05),
}
