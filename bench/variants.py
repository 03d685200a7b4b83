"""Prototype solvers measured by the benchmark, registered into gnri_core's ``SOLVERS``
at run time: the core itself is not modified here (the change proposed to it is
``bench/proposed_predictor.diff``).

``gnri_pred``: the core's secant GNRI (``gnri_core.solvers.solve_gnri_secant``, copied as of
commit a367079) with one addition, a *predictor* for each step's first iterate.

Every step of the core starts from z^0 = z_prev. For a step sigma -> sigma' the explicit
Euler step z_prev + h d(z_prev, sigma) (what ComfyUI's native FlipSigmas inversion does)
is a far better first guess, but needs D(z_prev, sigma): a model call at the *lower*
sigma. The previous step evaluated D at exactly that sigma, at its iterates; its best
evaluated iterate z_b is close to the returned z_prev, so

    z^0 = z_prev + h (z_prev - D(z_b, sigma)) / sigma            (no extra model call)

A guard drops the predictor (the sample restarts from z_prev with its next call) when
its residual is larger than the distance it moved: it moved by about the residual at
z_prev, so it made things worse. The first step (sigma = 0) has no predictor.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch

from .methods import Spec, add_spec

_CORE = None


def solve_gnri_predicted(p, o, guard: bool = True):
    """The core's ``solve_gnri_secant`` (a367079) plus the Euler predictor (lines marked +)."""
    problem, solvers = _CORE.problem, _CORE.solvers
    batch_dot, batch_norm2, converged, per_sample = (problem.batch_dot, problem.batch_norm2,
                                                     problem.converged, problem.per_sample)
    mu, g_scale = solvers._guidance(p, o)
    low, high = p.slope_bounds()
    variance = p.carry.get("data_variance")
    if variance is None:  # first step: the latent's own second moment
        variance = p.z_prev.flatten(1).pow(2).mean(1)
    slope = p.slope(p.denoiser_gain(variance)).clamp(low, high)
    batch, device = p.z_prev.shape[0], p.z_prev.device
    best_f = torch.full((batch,), float("inf"), device=device)
    best_rel, best_fz = best_f.clone(), p.z_prev
    valid = torch.zeros(batch, dtype=torch.long, device=device)
    accepted = improved = torch.ones(batch, dtype=torch.bool, device=device)
    z, zs, gs, history = p.z_prev, [], [], []
    last = p.carry.get("last_eval")                                                      # +
    predicted = last is not None and abs(last["sigma"] - p.sigma) <= 1e-6 * max(1.0, p.sigma)  # +
    if predicted:                                                                        # +
        z = p.z_prev + p.h * (p.z_prev - last["denoised"]) / p.sigma                     # +
    best_z, best_d = p.z_prev, None                                                      # +
    for _ in range(o.max_iters):
        denoised = p.denoised(z)                                                         # +
        fz = p.fixed_point_map(z, denoised)
        r = z - fz
        objective = r.abs().flatten(1).sum(1) + o.lam * g_scale * batch_norm2(z - mu)
        reject = torch.zeros(batch, dtype=torch.bool, device=device)                     # +
        if predicted:                                                                    # +
            predicted = False                                                            # +
            if guard and o.max_iters > 1:                                                # +
                reject = batch_norm2(r) > batch_norm2(z - p.z_prev)                      # +
        improved = (objective < best_f) & ~reject
        accepted = (objective < best_f * solvers.NONMONOTONE) & ~reject
        best_f = torch.where(improved, objective, best_f)
        best_rel = torch.where(improved, p.relative(r), best_rel)
        best_fz = torch.where(per_sample(improved, z), fz, best_fz)
        best_z = torch.where(per_sample(improved, z), z, best_z)                         # +
        best_d = denoised if best_d is None else torch.where(per_sample(improved, z), denoised, best_d)  # +
        history.append(float(torch.where(reject, p.relative(r), best_rel).max()))
        if converged(best_rel, o.tol):
            accepted = torch.zeros_like(accepted)
            break
        zs, gs = (zs + [z])[-(o.window + 1):], (gs + [-r])[-(o.window + 1):]
        valid = (valid + 1).clamp_max(len(zs))
        step = per_sample(torch.where(valid > 1, 1.0, 1.0 / slope), z)
        newton = solvers.multisecant_step(zs, gs, o.ridge, valid) if len(zs) > 1 else z - step * r
        newton = torch.where(per_sample(valid > 1, z), newton, z - step * r)
        if len(zs) > 1:
            d_z, d_r = zs[-1] - zs[-2], gs[-2] - gs[-1]
            secant = (batch_dot(d_r, d_z) / batch_dot(d_z, d_z).clamp_min(1e-30)).clamp(low, high)
            slope = torch.where(valid > 1, secant, slope)
        z = torch.where(per_sample(accepted, z), newton, best_fz)  # rejected predictor: best_fz = z_prev
        valid = torch.where(accepted, valid, 0)
        slope = torch.where(accepted | reject, slope, torch.ones_like(slope))            # + (| reject)
    p.carry["data_variance"] = p.data_variance(p.gain(slope))
    p.carry["last_eval"] = {"sigma": p.sigma_next, "z": best_z, "denoised": best_d}      # +
    _, beta = p.guidance_mean_var()
    plausible = batch_norm2(z - mu) <= solvers.GUIDE_RADIUS * (beta * p.z_prev[0].numel()) ** 0.5
    z = torch.where(per_sample(accepted & plausible, z), z, best_fz)
    return solvers._result(z, history, len(history), o.tol)


def register(core) -> None:
    """Registers the prototype, unless the core already has the proposed change (a
    ``predictor`` option): then the benchmark compares the default with ``predictor="none"``
    (the a367079 form) instead."""
    global _CORE
    _CORE = core
    from .methods import BY_KEY, SPECS
    if "predictor" in {f.name for f in fields(core.SolverOptions)}:
        i = SPECS.index(BY_KEY["gnri"])
        SPECS[i] = BY_KEY["gnri"] = Spec("gnri", "gnri secant + Euler predictor (default)", "gnri",
                                         {"update": "secant"})
        add_spec(Spec("gnri_nopred", "gnri secant, no predictor (a367079)", "gnri",
                      {"update": "secant", "predictor": "none"}))
        return
    solvers = core.solvers
    solvers.SOLVERS["gnri_pred"] = solve_gnri_predicted
    solvers.DEFAULTS["gnri_pred"] = replace(solvers.DEFAULTS["gnri"])
    add_spec(Spec("gnri_pred", "gnri + Euler predictor (prototype)", "gnri_pred"))
