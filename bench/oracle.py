"""A bound: Newton's method with the exact Jacobian, for free, on the tails beds.

    python -m bench oracle            # 100 generated images and 100 data samples per model x schedule
                                      #   -> bench/results/oracle/ (--models dct / iso: one each, then --report-only)
    python -m bench oracle --quick    # 6 of each, printed only (about 1.5 min)

What can any Newton-type solver reach on ``bench tails``' images, and at what cost? Each
inversion step is solved here by damped Newton with the photo mixture's exact Jacobian
(``PhotoMixture.jacobian``), which no model call pays for (a network's costs a backward
pass per latent dimension), from the Euler predictor with D(z_prev, sigma) exact and free
as well: only the evaluations of D at sigma' count, and one image per inversion (a batch
waits for its slowest image). Near a root no quasi-Newton step (secant, Anderson, the
spectral model) beats Newton's with the true Jacobian per call, so these rows are a
practical floor, not a theorem, for the calls-per-step target of issue 11: a solver that
starts from the same predictor and evaluates D only at sigma' spends at least about this
much to get as far (a better predictor or another path to the root could do better).

Rows: fixed budgets of K calls per step, tolerances on the relative residual (at most
``MAX_CALLS`` calls), and the 1e-3 tolerance followed by the core's own round-trip check
(``check_round_trip``: it regenerates unless every step converged, and inverts with ``ddim``
where the round trip misses 0.05), the floor the default pays for. Same images as
``python -m bench tails --batch 1`` (the same seeds, one image each).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from . import metrics
from .photo_model import PhotoMixture, dct2, idct2
from .tails import (MODELS, SCHEDULES, Config, below_ddim, data_samples, generate, save_results, schedule,
                    summary, write_report)
from .tails import measure as tails_measure

MAX_CALLS = 12
ROWS = (  # (label, calls per step at most, tolerance, round-trip check)
    ("exact Newton ×1", 1, 0.0, False),
    ("exact Newton ×2", 2, 0.0, False),
    ("exact Newton ×3", 3, 0.0, False),
    ("exact Newton to 3e-2", MAX_CALLS, 3e-2, False),
    ("exact Newton to 1e-2", MAX_CALLS, 1e-2, False),
    ("exact Newton to 1e-3", MAX_CALLS, 1e-3, False),
    ("exact Newton to 1e-3 + round-trip check", MAX_CALLS, 1e-3, True),
)
FULL = dict(images=100)
QUICK = dict(images=6)
INPUTS = {"generated": "deterministic (Euler) inversion of generated images",
          "data": "data samples (no exact inverse)"}


def newton_step(model: PhotoMixture, p, z, r):
    """z - J^-1 r for the step ``p``'s residual r = z - f(z), whose Jacobian (s / s') I + (h / s')
    dD/dz (``StepProblem.slope`` of the gain) is diagonal plus rank K + 1 in DCT coefficients:
    solved exactly by the Woodbury identity."""
    gain, u, v = model.jacobian(z, p.sigma_next)
    diag = p.slope(gain)
    u = p.h / p.sigma_next * u
    b = dct2(r.double(), model.m).flatten()
    a_b, a_u = b / diag, u / diag[:, None]
    small = torch.eye(u.shape[1], dtype=torch.float64) + v.T @ a_u
    x = a_b - a_u @ torch.linalg.solve(small, v.T @ a_b)
    return z - idct2(x.view(z.shape), model.m).to(z.dtype)


def invert_exact_newton(core, model: PhotoMixture, x0, ascending, budget: int, tol: float):
    """An InversionResult (batch 1) of damped Newton with the exact Jacobian, on the core's own
    step problem (residual and relative measure). Per step: evaluate r (one call); where the
    residual rose above the best, back off halfway toward the best iterate, else take the Newton
    step; stop once the best residual is within ``tol`` or the budget is spent, and return the
    Newton step from the best iterate (free)."""
    z = x0.double()
    result = core.InversionResult(noise=x0, trajectory=[x0.float()], sigmas=ascending, method="exact_newton",
                                  family=model.family)
    worst = 0.0
    for i in range(len(ascending) - 1):
        p = core.problem.StepProblem(model, z, float(ascending[i]), float(ascending[i + 1]), model.family)
        if p.sigma > 0:  # the Euler predictor, D(z_prev, s) free
            z = p.z_prev + p.h * (p.z_prev - model(p.z_prev, torch.tensor([p.sigma]))) / p.sigma
        best, best_z, answer = float("inf"), z, z  # answer: the Newton step from the best iterate
        for _ in range(budget):
            r = z - p.fixed_point_map(z, model(z, torch.tensor([p.sigma_next])))
            result.nfe += 1
            relative = float(p.relative(r))
            if relative > best:
                z = best_z + 0.5 * (z - best_z)
                continue
            best, best_z = relative, z
            z = answer = newton_step(model, p, z, r)
            if relative <= tol:
                break
        worst = max(worst, best)
        z = answer
        result.trajectory.append(z.float())
    result.noise = result.trajectory[-1]
    result.worst_residuals = [worst]
    return result


def measure(core, model, sigmas, batches, row) -> dict:
    """Per-image PSNR and noise error, and calls per step, of one row (one image per inversion)."""
    _, budget, tol, checked = row
    psnr, noise_err, nfe = [], [], 0
    for x0, noise, _ in batches:
        for i in range(x0.shape[0]):
            image = x0[i:i + 1]
            result = invert_exact_newton(core, model, image, sigmas.flip(0), budget, tol)
            if checked:
                result = core.check_round_trip(model, image, result, core.DEFAULTS["gnri"].round_trip_check,
                                              is_naive=False)
            nfe += result.nfe
            rec = core.reconstruct(model, result.noise, sigmas, family=model.family)
            psnr.append(metrics.psnr(rec, image, 2.0, clamp=(-1, 1)))
            noise_err.append(float("nan") if noise is None else metrics.relative_error(result.noise, noise[i:i + 1]))
    return {"psnr": psnr, "noise_err": noise_err, "calls_per_step": nfe / (len(psnr) * (len(sigmas) - 1))}


def run(core, mode: dict, models=tuple(MODELS), progress=None) -> list:
    """One record per (model, family, steps, inputs, row), in ``bench.tails``' format."""
    records = []
    for name in models:
        for family, steps in SCHEDULES:
            model = PhotoMixture(family, size=32, **MODELS[name])
            sigmas = schedule(family, steps)
            for inputs in INPUTS:
                batches = (generate(core, model, sigmas, mode["images"], False, batch=1) if inputs == "generated"
                           else data_samples(model, mode["images"], batch=1))
                case = dict(model=name, family=family, steps=steps, ancestral=False, inputs=inputs)
                records.append(dict(case, config="ddim", **tails_measure(core, model, sigmas, batches, Config("ddim", "ddim"))))
                for row in ROWS:
                    if progress:
                        progress(f"{name} {family} {steps} {inputs}: {row[0]}")
                    records.append(dict(case, config=row[0], **measure(core, model, sigmas, batches, row)))
    return records


def markdown(records, meta) -> str:
    parts = [f"# A bound: Newton with the exact Jacobian, for free ({meta['mode']})", "",
             f"`{meta['command']}` — {meta['seconds']:.0f} s (summed over processes), {meta['images']} images per model × family × "
             "schedule × input, one image per inversion; only evaluations of D at σ' count "
             "(the Jacobian and the predictor's D(z_prev, σ) are free).", ""]
    for name in dict.fromkeys(r["model"] for r in records):
        for inputs, title in INPUTS.items():
            parts += [summary(records, lambda r, n=name, i=inputs: r["model"] == n and r["inputs"] == i,
                              f"{name} mixture, {title}, all 4 schedules"), ""]
    parts += ["Per schedule (generated images; calls/step, p10 / median PSNR, images > 1 dB below ddim):", "",
              "| model | row | " + " | ".join(f"{f} {n}" for f, n in SCHEDULES) + " |", "|---" * 6 + "|"]
    below = below_ddim(records)
    for name in dict.fromkeys(r["model"] for r in records):
        for label, *_ in ROWS:
            cells = []
            for family, steps in SCHEDULES:
                r = next(r for r in records if r["model"] == name and r["inputs"] == "generated"
                         and r["config"] == label and (r["family"], r["steps"]) == (family, steps))
                p = np.array(r["psnr"])
                cells.append(f"{r['calls_per_step']:.2f}; {np.percentile(p, 10):.1f} / {np.median(p):.1f}; "
                             f"{below[id(r)]}")
            parts.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def main(args, results_dir: str) -> int:
    """Runs the models named by ``--models`` (default both) into ``results_<models>.json`` (``--quick``:
    printed only), then rewrites results.md from every ``results_*.json`` of the folder
    (``--report-only``: only that), as ``bench tails`` does."""
    from . import env
    out = args.out or os.path.join(results_dir, "oracle")
    if not args.report_only:
        mode = QUICK if args.quick else FULL
        core = env.core()
        models = tuple(args.models.split(",")) if args.models else tuple(MODELS)
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            records = run(core, mode, models, progress=lambda s: print(f"\r{s:<70}", end="", file=sys.stderr))
        print(file=sys.stderr)
        meta = dict(mode="quick" if args.quick else "full", seconds=time.perf_counter() - t0, images=mode["images"],
                    command="python -m bench oracle" + (" --quick" if args.quick else ""))
        if args.quick:
            print(markdown(records, meta))
            return 0
        save_results(out, models, meta, records)
    return write_report(out, markdown)
