"""Benchmark of every inversion method against ComfyUI's native inversion.

One command, one subcommand per benchmark (all over the one method registry, methods.py):

    python -m bench                   # suite: every method on every case -> bench/results/
    python -m bench --quick           # the suite, < 2 min on 2 cores -> bench/results/quick/
    python -m bench tails [--quick] [--batch 1]  # per-image distributions over >= 100 generated images (tails.py)
    python -m bench oracle [--quick]  # a bound: Newton with the exact Jacobian, for free, on the tails beds (oracle.py)
    python -m bench sensitivity       # regeneration's sensitivity to tiny noise errors (sensitivity.py)
    python -m bench edit [--quick]    # editing benchmark on the world models (edit_bench.py)
    python -m bench uses [--quick]    # interpolation and rare-concept seeds on the world models (uses_bench.py)
    python -m bench recon [--quick]   # reconstruction distributions on the world models (world_recon.py)
    python -m bench diffusers         # cross-checks against diffusers' schedulers (diffusers_check.py)
    python -m bench gpu               # full-size SDXL UNet / Flux transformer timings (needs CUDA; gpu.py)

(``--gpu``, ``--edit`` and ``--uses`` are the same as the subcommands.)

Run from the repository root with the test environment active
(``bash scripts/test.sh`` builds .venv/; ``source .venv/bin/activate``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from . import env

RESULTS = os.path.join(env.ROOT, "bench", "results")

FULL = dict(photo_families=("eps", "flow"), photo_steps=(4, 10, 50),
            photo_inputs=("gen0", "gen1", "chelsea", "motorcycle_right", "lfw_face"),
            budgets=(1, 2, 3, 4, 6, 8), tiny_families=("eps", "v", "flow"), tiny_steps=(4, 10, 50),
            tiny_inputs=("gen", "random"), tiny_budgets=(2,), repeat=2, photo_repeat=1)
QUICK = dict(photo_families=("eps", "flow"), photo_steps=(4, 10), photo_inputs=("gen0", "chelsea"),
             budgets=(1, 2, 3, 4), tiny_families=("eps", "v", "flow"), tiny_steps=(4,),
             tiny_inputs=("gen",), tiny_budgets=(2,), repeat=1, photo_repeat=1)
SMOKE = dict(photo_families=("eps",), photo_steps=(4,), photo_inputs=("gen0",), budgets=(2,),
             tiny_families=("eps",), tiny_steps=(4,), tiny_inputs=("gen",), tiny_budgets=(2,), repeat=1,
             photo_repeat=1)


COMMANDS = ("suite", "tails", "oracle", "sensitivity", "edit", "uses", "recon", "diffusers", "gpu")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="suite", choices=COMMANDS,
                   help="suite (default): every method on every case; the others: see above")
    p.add_argument("--quick", action="store_true", help="small run (< 2 min on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="--quick on the smallest case only (CI)")
    p.add_argument("--gpu", action="store_true", help="full-size SDXL/Flux timings on CUDA")
    p.add_argument("--uses", action="store_true", help="interpolation and rare-concept seeds on the world models")
    p.add_argument("--world-family", help="with --uses: unet, flux or unet,flux (default unet)")
    p.add_argument("--edit", action="store_true", help="editing benchmark on the world models (with --quick/--smoke)")
    p.add_argument("--family", choices=("unet", "flux"), help="edit, recon: this world model only")
    p.add_argument("--out", help="output folder (default bench/results, --quick: bench/results/quick)")
    p.add_argument("--methods", help="comma-separated method keys to run (default: all)")
    p.add_argument("--models", help="tails, oracle: comma-separated photo models to run (dct, iso; default both)")
    p.add_argument("--batch", type=int, help="tails: images per inversion (default 4; 1: what one photo costs, "
                   "the cost rows only, into results/tails_batch1)")
    p.add_argument("--held-out", action="store_true",
                   help="recon: 8 and 50 steps (schedules no default was chosen on), the floor's rows only")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny ComfyUI models")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and the plots from the results.json already in the output folder")
    args = p.parse_args(argv)
    for flag in ("gpu", "uses", "edit"):
        if getattr(args, flag):
            args.command = flag
    return args


def main(argv=None):
    args = parse(argv)
    if args.command == "tails":
        from . import tails
        sys.exit(tails.main(args, RESULTS))
    if args.command == "oracle":
        from . import oracle
        sys.exit(oracle.main(args, RESULTS))
    if args.command == "sensitivity":
        from . import sensitivity
        sys.exit(sensitivity.main())
    if args.command == "diffusers":
        from . import diffusers_check
        sys.exit(diffusers_check.main())
    if args.command == "gpu":
        from . import gpu
        sys.exit(gpu.main(args))
    if args.command == "uses":
        from . import uses_bench
        sys.exit(uses_bench.main(args))
    if args.command == "recon":
        from . import world_recon
        sys.exit(world_recon.main(args, RESULTS))
    if args.command == "edit":
        from . import edit_bench
        sys.exit(edit_bench.main(args))
    config = SMOKE if args.smoke else QUICK if args.quick else FULL
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out or (RESULTS if mode == "full" else os.path.join(RESULTS, mode))
    os.makedirs(out, exist_ok=True)

    if args.report_only:
        return report_only(out, config)
    t_start = time.perf_counter()
    pack = env.setup()
    core = pack.gnri_core
    import torch
    from tqdm import tqdm

    from . import comfy_bench, methods, photo_bench, report
    specs = list(methods.SPECS)
    if args.methods:
        keep = set(args.methods.split(",")) | {"ddim"}
        specs = [s for s in specs if s.key in keep]

    photo_cases = [photo_bench.PhotoCase(f, n, config["photo_inputs"])
                   for f in config["photo_families"] for n in config["photo_steps"]]
    tiny_cases = [] if args.no_tiny else [comfy_bench.TinyCase(f, n, config["tiny_inputs"])
                                           for f in config["tiny_families"] for n in config["tiny_steps"]]
    default_budget = core.DEFAULTS["gnri"].max_iters  # checked on every case, tiny ones too
    extra = {"gnri": (default_budget,)}
    total = (photo_bench.count(photo_cases, specs, config["budgets"])
             + comfy_bench.count(tiny_cases, specs, config["tiny_budgets"], extra))
    sampling = photo_bench.model_samplings()
    records = []
    with torch.inference_mode(False), tqdm(total=total, desc=f"bench ({mode})", unit="run",
                                           file=sys.stderr, dynamic_ncols=True) as bar:
        records += list(photo_bench.run(core, photo_cases, specs, config["budgets"], sampling, bar,
                                        repeat=config["photo_repeat"]))
        records += list(comfy_bench.run(pack, tiny_cases, specs, config["tiny_budgets"], bar,
                                        repeat=config["repeat"], extra=extra))
    elapsed = time.perf_counter() - t_start

    from .metrics import geomean
    for r in records:  # per-iteration geometric mean over the steps (the residual plot), not every step
        hs = r.pop("histories", [])
        length = max((len(h) for h in hs), default=0)
        r["history"] = [geomean([h[k] for h in hs if len(h) > k]) for k in range(length)]
    meta = {"mode": mode, "seconds": round(elapsed, 1), "command": command(mode), "default_budget": default_budget,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "records": _round(records)}, f, default=_json, indent=None)
    plots = [] if args.no_plots else report.write_plots(records, specs, out, config["budgets"])
    text = markdown(records, specs, config, meta, plots, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"\nwrote {out}/results.md, results.json" + "".join(f", {os.path.basename(p)}" for p in plots)
          + f" in {elapsed:.0f} s", file=sys.stderr)


CHECKED = ("gnri", "gnri_pred")  # methods whose "never worse than naive" is checked


def report_only(out, config):
    from . import methods, report
    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    records, meta = data["records"], data["meta"]
    plots = report.write_plots(records, methods.SPECS, out, config["budgets"])
    text = markdown(records, methods.SPECS, config, meta, plots, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


def command(mode):
    return {"full": "python -m bench", "quick": "python -m bench --quick",
            "smoke": "python -m bench --smoke"}[mode]


def _round(o):
    """Floats to 5 significant digits (the JSON is committed)."""
    if isinstance(o, float):
        return float(f"{o:.5g}") if math.isfinite(o) else o
    if isinstance(o, dict):
        return {k: _round(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_round(v) for v in o]
    return o


def _json(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def markdown(records, specs, config, meta, plots, out):
    from . import report
    budget = 2 if 2 in config["budgets"] else config["budgets"][0]
    parts = [f"# Inversion benchmark ({meta['mode']})", "",
             f"`{meta['command']}` — {meta['seconds']:.0f} s on {meta['machine']}, torch {meta['torch']}, "
             f"{meta['threads']} thread(s).", ""]
    parts += [f"## {budget} model calls per step, every case", "",
              "Exact photo model: pixels in [-1, 1]; tiny ComfyUI models: raw latents. "
              "ddim and ComfyUI's native inversion use 1 call per step. Best per row in bold.", "",
              report.budget_table(records, specs, budget, lambda r: r["psnr"], report.fmt_db,
                                  "Reconstruction PSNR (dB)"), "",
              report.budget_table([r for r in records if r.get("noise_err") is not None], specs, budget,
                                  lambda r: r["noise_err"], report.fmt_e,
                                  "Relative error of the inverted noise (images generated from known noise)",
                                  better="low"), ""]
    parts += ["## Photo model: every method and budget, over all cases", "",
              report.summary_table(records, specs, config["budgets"]), ""]
    tiny = report.tiny_table(records, specs, config["tiny_budgets"][0])
    if tiny:
        parts += [f"## Tiny ComfyUI models through ComfyUI's sampling ({config['tiny_budgets'][0]} calls/step)", "",
                  report.tiny_summary(records, specs, config["tiny_budgets"][0]), "", "Every case:", "",
                  tiny, ""]
    wins = report.winners(records, specs, budget)
    tally = {}
    for m in wins.values():
        tally[m] = tally.get(m, 0) + 1
    parts += [f"Most exact at {budget} calls/step (noise error where known, else PSNR), cases won: "
              + ", ".join(f"{k} {v}" for k, v in sorted(tally.items(), key=lambda kv: -kv[1])), ""]
    for key in CHECKED:
        if any(r["method"] == key for r in records):
            parts += [report.default_check(records, specs, key, budget), ""]
    default_budget = meta.get("default_budget")
    if default_budget and default_budget != budget and default_budget in config["budgets"]:
        parts += [report.default_check(records, specs, "gnri", default_budget, rank=False)
                  + f" ({default_budget} calls/step is the default `iterations`.)", ""]
    for p in plots:
        parts.append(f"![{os.path.basename(p)}]({os.path.relpath(p, out)})")
    return "\n".join(parts) + "\n"
