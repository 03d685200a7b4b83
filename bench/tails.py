"""Tails: per-image distributions over many images the exact photo model generated.

    python -m bench tails            # >= 100 images per model x family x schedule, writes bench/results/tails/
    python -m bench tails --quick    # 8 images per case (about 1 min), prints the tables
    python -m bench tails --batch 1  # one image per inversion: what a single photo costs (the cost rows only)

Two exact models (``photo_model.PhotoMixture``): the DCT-covariance mixture ("dct") and
the tight isotropic one (components of std 0.3, "iso"); EPS on 4- and 10-step Karras
schedules (SD1.5's sigma range), flow on 4 and 10 uniform steps. Every image was
generated from known noise by the deterministic Euler sampler (``reconstruct``), in
batches of 4 as the nodes see them, so an exact inverse exists. Ancestral inversion
(Euler-a, eta 1, frozen noise maps) is measured on its own generated images. "Data"
images are drawn from the mixture itself (``PhotoMixture.sample``): the model's world, but
not what its few-step sampler generates, so no exact inverse exists. "Photos" are real
photos outside the mixture (``photo_model.heldout_photos``: LFW faces and crops of four
held-out scenes), the same 100 for every case: what a user brings; only the reconstruction
is measured, and on the tight "iso" mixture, which cannot generate them, no method can.

Per method and budget: model calls per step, min / 10th percentile / median
reconstruction PSNR, median relative error of the inverted noise, the number of images
more than 1 dB below ``ddim`` on the same image, and (lambda table) the inverted noise's
statistics: std, excess kurtosis, lag-1 spatial autocorrelation (Gaussian noise: 1, 0, 0).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics
from .methods import BY_KEY, FIXED_BUDGET, FIXED_BUDGET_CHECKED, NO_CHECK, core_options
from .photo_model import PhotoMixture, heldout_photos

MODELS = {"dct": {}, "iso": {"isotropic": 0.3}}
SCHEDULES = (("eps", 4), ("eps", 10), ("flow", 4), ("flow", 10))
BATCH = 4
FULL = dict(images=100, ancestral_images=40, lams=(0.0, 1.0, 10.0),
            runs=(("gnri", 2), ("gnri", 4), ("gnri_pred", 3), ("anderson", 3), ("anderson", 5), ("fixed_point", 3)))
QUICK = dict(images=8, ancestral_images=4, lams=(0.0,), runs=(("gnri", 2), ("anderson", 3)))
NO_CHECK_KEY = "gnri default without the round-trip check"
# --batch other than BATCH: the rows that say what the default and the real-time setting cost
COST_ROWS = ("ddim", "gnri default", NO_CHECK_KEY,
             "gnri fixed budget (extra_iters 0), no check", "gnri fixed budget (extra_iters 0) + round-trip check")
SLACK_DB = 1.0  # "worse than ddim" means more than this below it
# the default before the spectral step and the mode-flip guard
PREVIOUS_DEFAULT = {"jacobian": "scalar", "anchor": "forward_mean", "lam": 1.0, "flip_ratio": 0.0, "extra_iters": 0,
                    **NO_CHECK}
INPUTS = ("generated", "ancestral", "data", "photos")  # Euler on generated images; Euler-a; Euler on data samples, real photos
INPUT_TITLES = {"data": "data samples (drawn from the mixture, not generated: no exact inverse; noise error not measurable)",
                "photos": "real photos outside the mixture (held-out faces and scene crops: no exact inverse)"}


@dataclass(frozen=True)
class Config:
    """One row: a core method with options (``default``: the core's DEFAULTS, early stop included)."""
    key: str
    method: str
    options: dict = field(default_factory=dict)


def configs(core, mode: dict) -> list:
    """ddim, the default (early stop and round-trip check included), the default's solver
    alone, ``runs`` (spec key, budget) at tol 0, the default at 1 iteration, the fixed
    budget, and the solver's ablations and other lambdas, without the check (its own lambda:
    the solver-alone row)."""
    out = [Config("ddim", "ddim"), Config("gnri default", "gnri"), Config(NO_CHECK_KEY, "gnri", NO_CHECK)]
    for key, budget in mode["runs"]:
        spec = BY_KEY[key]
        out.append(Config(f"{key} ×{budget}", spec.method, core_options(spec, budget)))
    out.append(Config("gnri default ×1 (no check)", "gnri", {"max_iters": 1, **NO_CHECK}))
    out.append(Config("gnri fixed budget (extra_iters 0), no check", "gnri", FIXED_BUDGET))
    out.append(Config("gnri fixed budget (extra_iters 0) + round-trip check", "gnri", FIXED_BUDGET_CHECKED))
    out.append(Config("no check, contraction 0.5", "gnri", {"contraction": 0.5, **NO_CHECK}))
    out.append(Config("no check, scalar jacobian", "gnri", {"jacobian": "scalar", **NO_CHECK}))
    out.append(Config("no check, anchor forward_mean", "gnri", {"anchor": "forward_mean", **NO_CHECK}))
    out.append(Config("no check, flip_ratio 0 (no mode-flip guard)", "gnri", {"flip_ratio": 0.0, **NO_CHECK}))
    out.append(Config("previous default (scalar, forward mean, λ 1, no guard)", "gnri", PREVIOUS_DEFAULT))
    out += [Config(f"no check, lam {lam:g}", "gnri", {"lam": lam, **NO_CHECK}) for lam in mode["lams"]]
    return out


def schedule(family: str, steps: int) -> torch.Tensor:
    """Descending sigmas: Karras (rho 7) over SD1.5's range for EPS, uniform for flow; ends at 0."""
    if family == "flow":
        return torch.linspace(1.0, 0.0, steps + 1)
    from comfy.k_diffusion.sampling import get_sigmas_karras
    return get_sigmas_karras(steps, 0.0292, 14.6146).float()


def generate(core, model, sigmas, images: int, ancestral: bool, seed: int = 0, batch: int = BATCH):
    """Batches of (x0, noise, noise maps or None) the model generated from known noise."""
    out = []
    for b in range(0, images, batch):
        noise = model.initial_noise(float(sigmas[0]), batch, seed=seed + b + 1)
        maps = (core.ancestral.seeded_noise_maps(noise, sigmas, model.family, seed + b) if ancestral else None)
        x0 = core.reconstruct(model, noise, sigmas, noise_maps=maps, family=model.family)
        out.append((x0, noise, maps))
    return out


def data_samples(model, images: int, seed: int = 0, batch: int = BATCH):
    """Batches of (x0, None, None): images drawn from the mixture, not generated."""
    return [(model.sample(batch, seed=seed + 1000 + b), None, None) for b in range(0, images, batch)]


def photo_batches(images: int, size: int = 32, batch: int = BATCH):
    """Batches of (x0, None, None): real photos outside the mixture (the same for every case)."""
    photos = heldout_photos(images, size)
    return [(photos[b:b + batch], None, None) for b in range(0, images, batch)]


def measure(core, model, sigmas, batches, config: Config) -> dict:
    """Per-image PSNR, noise error and noise statistics, and calls per step, of one config."""
    psnr, noise_err, stats, nfe = [], [], [], 0
    for x0, noise, maps in batches:
        try:
            result = core.invert(model, x0, sigmas.flip(0), method=config.method, family=model.family,
                                 noise_maps=maps, **config.options)
        except Exception as exc:  # a crash is a finding: record it, keep going
            return {"error": f"{type(exc).__name__}: {exc}"[:200]}
        nfe += result.nfe
        rec = core.reconstruct(model, result.noise, sigmas, noise_maps=maps, family=model.family)
        for i in range(x0.shape[0]):
            psnr.append(metrics.psnr(rec[i:i + 1], x0[i:i + 1], 2.0, clamp=(-1, 1)))
            noise_err.append(float("nan") if noise is None else
                             metrics.relative_error(result.noise[i:i + 1], noise[i:i + 1]))
            eps = result.noise[i:i + 1] / (float(sigmas[0]) if model.family == "eps" else 1.0)
            stats.append(metrics.noise_stats(eps))
    steps = len(sigmas) - 1
    return {"psnr": psnr, "noise_err": noise_err, "calls_per_step": nfe / (len(batches) * steps),
            **{k: [s[k] for s in stats] for k in ("std", "kurtosis", "autocorr")}}


def run(core, config_mode: dict, models=tuple(MODELS), progress=None) -> list:
    """One record per (model, family, steps, ancestral, config)."""
    records = []
    batch = config_mode.get("batch", BATCH)
    rows = [c for c in configs(core, config_mode) if batch == BATCH or c.key in COST_ROWS]
    photos = photo_batches(config_mode["images"], batch=batch)  # the same real photos for every case
    for name in models:
        kwargs = MODELS[name]
        for family, steps in SCHEDULES:
            model = PhotoMixture(family, size=32, **kwargs)
            sigmas = schedule(family, steps)
            for inputs in INPUTS:
                ancestral = inputs == "ancestral"
                images = config_mode["ancestral_images" if ancestral else "images"]
                batches = (data_samples(model, images, batch=batch) if inputs == "data" else photos
                           if inputs == "photos" else generate(core, model, sigmas, images, ancestral, batch=batch))
                for config in rows:
                    if inputs != "generated" and ("lam" in config.key or "pred" in config.key):
                        continue  # lambda and predictor tables: generated images only
                    if ancestral and ("contraction" in config.key or "flip_ratio" in config.key):
                        continue  # contraction and the mode-flip guard are off on ancestral steps
                    if progress is not None:
                        progress(f"{name} {family} {steps} {inputs} {config.key}")
                    record = {"model": name, "family": family, "steps": steps, "ancestral": ancestral,
                              "inputs": inputs, "config": config.key}
                    record.update(measure(core, model, sigmas, batches, config))
                    records.append(record)
    return records


def _case(r) -> tuple:
    return r["model"], r["family"], r["steps"], r["inputs"]


def below_ddim(records) -> dict:
    """config -> images more than SLACK_DB below ddim on the same image, per record list."""
    ddim = {_case(r): r["psnr"] for r in records if r["config"] == "ddim"}
    out = {}
    for r in records:
        if "psnr" not in r:
            continue
        base = ddim[_case(r)]
        out[id(r)] = sum(1 for a, b in zip(r["psnr"], base) if a < b - SLACK_DB)
    return out


def summary(records, where, title: str, extra_stats: bool = False) -> str:
    """Per config over the records selected by ``where``: the distribution table."""
    below = below_ddim(records)
    picked = [r for r in records if where(r)]
    order = list(dict.fromkeys(r["config"] for r in picked))
    head = "| method | calls/step | min | p10 | median | median noise err | > 1 dB below ddim | crashes |"
    if extra_stats:
        head += " noise std | kurtosis | autocorr |"
    lines = [f"**{title}**", "", head, "|---" * (head.count("|") - 1) + "|"]
    for key in order:
        rows = [r for r in picked if r["config"] == key]
        ok = [r for r in rows if "psnr" in r]
        crashes = len(rows) - len(ok)
        if not ok:
            lines.append(f"| {key} | — | — | — | — | — | — | {crashes} |" + (" — | — | — |" if extra_stats else ""))
            continue
        psnr = np.concatenate([r["psnr"] for r in ok])
        err = np.concatenate([r["noise_err"] for r in ok])
        calls = np.mean([r["calls_per_step"] for r in ok])
        n_below = sum(below[id(r)] for r in ok)
        cells = [f"{calls:.2f}", f"{psnr.min():.1f}", f"{np.percentile(psnr, 10):.1f}", f"{np.median(psnr):.1f}",
                 "—" if np.isnan(err).all() else f"{np.nanmedian(err):.1e}", f"{n_below} / {len(psnr)}", str(crashes)]
        if extra_stats:
            cells += [f"{np.median(np.concatenate([r[k] for r in ok])):.3f}" for k in ("std", "kurtosis", "autocorr")]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(records, meta) -> str:
    models = [m for m in MODELS if any(r["model"] == m for r in records)]
    main = [k for k in dict.fromkeys(r["config"] for r in records) if "lam" not in k]
    parts = [f"# Tails: per-image distributions ({meta['mode']})", "",
             f"`{meta['command']}` — {meta['seconds']:.0f} s (summed over processes), {meta['images']} generated images per model × "
             f"family × schedule ({meta['ancestral_images']} for ancestral), batches of {meta.get('batch', BATCH)}.", ""]
    for name in models:
        parts += [summary(records, lambda r, n=name: r["model"] == n and r["inputs"] == "generated"
                          and r["config"] in main,
                          f"{name} mixture, deterministic (Euler) inversion, all 4 schedules"), ""]
    for inputs, title in INPUT_TITLES.items():
        for name in models:
            if any(r["inputs"] == inputs and r["model"] == name for r in records):
                parts += [summary(records, lambda r, n=name, i=inputs: r["model"] == n and r["inputs"] == i
                                  and r["config"] in main, f"{name} mixture, {title}"), ""]
    for name in models:
        parts += [summary(records, lambda r, n=name: r["model"] == n and r["ancestral"],
                          f"{name} mixture, ancestral inversion (eta 1, frozen noise maps)"), ""]
    lam = [k for k in dict.fromkeys(r["config"] for r in records) if "lam" in k]
    for name in models if lam else ():
        parts += [summary(records, lambda r, n=name: r["model"] == n and r["inputs"] == "generated"
                          and r["config"] in ["ddim", NO_CHECK_KEY] + lam,
                          f"lambda: {name} mixture, deterministic, the solver without the round-trip check "
                          f"(default lam {meta['default_lam']:g})", extra_stats=True), ""]
    parts += ["Default, per case (deterministic; min / p10 / median PSNR, images > 1 dB below ddim):", ""]
    below = below_ddim(records)
    parts += ["| model | family | steps | calls/step | min | p10 | median | below ddim |", "|---" * 8 + "|"]
    for r in records:
        if r["config"] == "gnri default" and "psnr" in r:
            p = np.array(r["psnr"])
            tag = {"generated": "", "ancestral": " anc"}.get(r["inputs"], " " + r["inputs"])
            parts.append(f"| {r['model']} | {r['family']} | {r['steps']}{tag} | "
                         f"{r['calls_per_step']:.2f} | {p.min():.1f} | {np.percentile(p, 10):.1f} | "
                         f"{np.median(p):.1f} | {below[id(r)]} / {len(p)} |")
    return "\n".join(parts) + "\n"


def save_results(out: str, models, meta: dict, records: list) -> None:
    """One process's run: ``results_<models>.json`` in ``out``."""
    from .run import _round
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"results_{'_'.join(models)}.json"), "w") as f:
        json.dump({"meta": meta, "records": _round(records)}, f, default=str)


def write_report(out: str, markdown) -> int:
    """results.md of ``out`` from every ``results_*.json`` there (one per process: the seconds
    summed), printed too."""
    records, meta = [], None
    for name in sorted(os.listdir(out)):
        if name.startswith("results_") and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                data = json.load(f)
            records += data["records"]
            meta = dict(data["meta"], seconds=(meta or {}).get("seconds", 0.0) + data["meta"]["seconds"])
    text = markdown(records, meta)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main(args, results_dir: str) -> int:
    """Runs the models named by ``--models`` (default all) into ``results_<models>.json``,
    then rewrites results.md from every ``results_*.json`` of the folder (``--report-only``:
    only that; so the two models can run as two processes and be merged)."""
    from . import env
    mode = "quick" if args.quick else "full"
    batch = BATCH if args.batch is None else args.batch
    if batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {batch}")
    config_mode = dict(QUICK if args.quick else FULL, batch=batch)
    folder = ("tails" if mode == "full" else "tails_quick") + (f"_batch{batch}" if batch != BATCH else "")
    out = args.out or os.path.join(results_dir, folder)
    os.makedirs(out, exist_ok=True)
    if not args.report_only:
        core = env.core()
        models = tuple(args.models.split(",")) if args.models else tuple(MODELS)
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            records = run(core, config_mode, models,
                          progress=lambda s: print(f"\r{s:<70}", end="", file=sys.stderr))
        print(file=sys.stderr)
        meta = {"mode": mode, "seconds": time.perf_counter() - t0,
                "command": "python -m bench tails" + (" --quick" if args.quick else "")
                + (f" --batch {batch}" if batch != BATCH else ""),
                "default_lam": core.DEFAULTS["gnri"].lam, **config_mode}
        save_results(out, models, meta, records)
    return write_report(out, markdown)
