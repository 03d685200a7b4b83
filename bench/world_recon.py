"""Reconstruction on the trained world models: per-image distributions.

    python -m bench recon            # 160 scenes per world model, 4 and 20 steps -> bench/results/recon/
    python -m bench recon --quick    # 16 scenes, printed only
    python -m bench recon --held-out # 8 and 50 steps, the floor's rows only -> bench/results/recon_held_out/

Each scene (``gnri_world.scenes``, rendered and encoded as the nodes see it) is inverted
with its own caption at cfg 1 on the family's 4- and 20-step schedules (UNet ``normal``,
Flux ``simple``; 20 is what the world ships with), then sampled back through Prompt Swap
Edit at strength 0 (the same caption, cfg 1, no mask): the round trip an artist runs when nothing is changed. Per method: model
calls per step, min / 10th percentile / median PSNR of the whole image (pixels in [0, 1]),
the count of scenes more than 1 dB below ``ddim`` and, with the round-trip check, the share
of scenes it also inverted with ``ddim`` (all 160 are one batch, which pays for any; one
photo per inversion pays 2 calls per step only where it was compared). The ``euler_ancestral`` rows invert
with frozen noise maps (the nodes' ``sampler`` input) and are sampled back with the same
maps; they are compared with ``ddim`` run the same way. The scenes are the world's own
photos, not images the few-step sampler generated: no exact inverse is guaranteed.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from . import env, metrics
from .edit_bench import Config, World
from .methods import BY_KEY, FIXED_BUDGET, FIXED_BUDGET_CHECKED, NO_CHECK, core_options
from .tails import NO_CHECK_KEY, PREVIOUS_DEFAULT

STEPS = (4, 20)
SEEDS = {"unet": 77, "flux": 78}
FULL = dict(scenes=160)
QUICK = dict(scenes=16)
ROWS = (  # (label, method, core options)
    ("native (FlipSigmas)", "native", {}),
    ("ddim", "ddim", {}),
    ("gnri default", "gnri", {}),
    (NO_CHECK_KEY, "gnri", NO_CHECK),
    ("no check, trust_ratio 0 (the previous step 5)", "gnri", {"trust_ratio": 0.0, **NO_CHECK}),
    ("gnri fixed budget (extra_iters 0), no check", "gnri", FIXED_BUDGET),
    ("gnri fixed budget (extra_iters 0) + round-trip check", "gnri", FIXED_BUDGET_CHECKED),
    ("gnri fixed budget + round-trip check 0.1 (not adopted)", "gnri", dict(FIXED_BUDGET_CHECKED, round_trip_check=0.1)),
    ("gnri ×2", "gnri", core_options(BY_KEY["gnri"], 2)),
    ("no check, flip_ratio 0 (no mode-flip guard)", "gnri", {"flip_ratio": 0.0, **NO_CHECK}),
    ("previous default (scalar, forward mean, λ 1, no guard)", "gnri", PREVIOUS_DEFAULT),
    ("ddim, euler_ancestral", "ddim", {"ancestral": True}),  # frozen noise maps, regenerated the same way
    ("gnri default, euler_ancestral", "gnri", {"ancestral": True}),
    (NO_CHECK_KEY + ", euler_ancestral", "gnri", {"ancestral": True, **NO_CHECK}),
)
HELD_OUT_STEPS = (8, 50)  # ``--held-out``: schedules no setting was chosen on, the floor's rows only
HELD_OUT_ROWS = ("ddim", "gnri default", "gnri fixed budget (extra_iters 0) + round-trip check",
                 "ddim, euler_ancestral", "gnri default, euler_ancestral")
SLACK_DB = 1.0
ROUND_TRIP = Config(strength=0.0, edit_cfg=1.0, mask="none")  # Prompt Swap Edit: the same caption, cfg 1


def measure(world, x0, images, positive, method: str, options: dict, steps: int) -> dict:
    """Per-scene PSNR of the round trip and model calls per step for one row."""
    from gnri_world import latent
    world.clock.reset()
    ascending = world.sigmas(steps)
    with torch.no_grad():
        if method == "native":
            inversion = world.native(x0, positive, ascending)
        else:
            _, inversion = world.glue.invert_latent(world.model, positive, None, {"samples": x0}, ascending, 1.0,
                                                    method, **options)
        calls = world.clock.per_image(x0.shape[0]) / steps
    samples, _ = world.prompt_swap(ROUND_TRIP, inversion, positive, positive, None)
    rec = latent.decode(samples, world.family)
    compared = [] if method == "native" else inversion.result.compared  # the check also ran ddim on these
    return {"psnr": [metrics.psnr(rec[i], images[i], 1.0) for i in range(len(images))], "calls_per_step": calls,
            "compared": compared}


def run(pack, family: str, scenes_n: int, steps_list=STEPS, rows=ROWS) -> list[dict]:
    from gnri_world import latent, scenes
    world = World(pack, family)
    picked = scenes.sample_scenes(scenes_n, seed=SEEDS[family])
    images = scenes.render_batch(picked)
    x0 = latent.encode(images, family)
    positive = world.conditioning([s.caption() for s in picked])
    return [dict(family=family, steps=steps, label=label, method=method, ancestral=bool(options.get("ancestral")),
                 **measure(world, x0, images, positive, method, options, steps))
            for steps in steps_list for label, method, options in rows]


def table(records, family: str, steps: int) -> str:
    rows = [r for r in records if r["family"] == family and r["steps"] == steps]
    ddim = {r["ancestral"]: r["psnr"] for r in rows if r["method"] == "ddim"}
    lines = [f"**world {family}, {steps} steps, {len(ddim[False])} scenes**", "",
             "| method | calls/step | min | p10 | median | > 1 dB below ddim | compared with ddim |", "|---" * 7 + "|"]
    for r in rows:
        p = np.array(r["psnr"])
        base = ddim[r["ancestral"]]  # ancestral rows: against ddim with the same frozen noise maps
        below = int(sum(a < b - SLACK_DB for a, b in zip(r["psnr"], base)))
        compared = r.get("compared") or []
        share = f"{100 * np.mean(compared):.0f} %" if compared else "–"
        lines.append(f"| {r['label']} | {r['calls_per_step']:.2f} | {p.min():.1f} | {np.percentile(p, 10):.1f} | "
                     f"{np.median(p):.1f} | {below} / {len(p)} | {share} |")
    return "\n".join(lines)


def main(args, results_dir: str) -> int:
    mode = QUICK if args.quick else FULL
    pack = env.setup()
    t0 = time.perf_counter()
    records = []
    steps, rows = (HELD_OUT_STEPS, [r for r in ROWS if r[0] in HELD_OUT_ROWS]) if args.held_out else (STEPS, ROWS)
    for family in (args.family,) if args.family else ("unet", "flux"):
        records += run(pack, family, mode["scenes"], steps, rows)
    seconds = time.perf_counter() - t0
    command = "python -m bench recon" + (" --quick" if args.quick else "") + (" --held-out" if args.held_out else "")
    text = "\n\n".join([f"# Reconstruction on the world models\n\n`{command}` — {seconds:.0f} s, "
                        f"Prompt Swap Edit at strength 0 after each inversion (cfg 1), PSNR of the whole image."]
                       + [table(records, family, steps)
                          for family, steps in dict.fromkeys((r["family"], r["steps"]) for r in records)]) + "\n"
    print(text)
    if not args.quick:
        out = args.out or os.path.join(results_dir, "recon_held_out" if args.held_out else "recon")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"seconds": seconds, "records": records}, f)
    return 0
