"""The paper's other uses, measured on the trained world (``gnri_world``): interpolation
between two inverted images and rare-concept seeds, GNRI against naive (``ddim``) inversion.

    python -m bench --uses            # writes bench/results/uses/ (results.md, results.json, PNG)
    python -m bench --uses --quick    # a few pairs and draws, bench/results/uses_quick/

Everything runs through the nodes' code: ``comfy_glue.invert_latent`` (GNRI Invert),
``uses_nodes.interpolate`` (GNRI Interpolate), ``uses_nodes.ConceptNoise`` (GNRI Concept
Noise) fed to ComfyUI's own CFGGuider + euler (SamplerCustomAdvanced), on the world's
ComfyUI ModelPatcher. Images are read back by the world's scorer.

Interpolation: P pairs of random one-object scenes, each side inverted with its caption
(cfg 1, the node default), F frames. Measured: PSNR of the end frames against the input
images; per attribute (shape, colour, background) the share of pairs whose readings along
the frames are monotonic (a's value, then b's, switching once at most); the share whose
pixel distance to image a grows frame by frame; the statistics (std, excess kurtosis,
lag-1 autocorrelation) of the interpolated noise, scaled to unit noise, at every frame
(also for a plain lerp of GNRI's noises, which slerp replaces).

Rare concept: the world's rare combination (``scenes.RARE``: a yellow triangle, drawn
10x less often in training). For each background, K example scenes are inverted with the
caption; N generations per condition with that caption at the world's shipped cfg:
from random seeds, and from GNRI Concept Noise of the GNRI / ddim inversions at several
spreads. Measured: share scored as the concept (shape and colour), share fully right, and
the draws' diversity (mean pairwise RMS pixel distance between images of one caption).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

from . import env, metrics

RESULTS = os.path.join(env.ROOT, "bench", "results")
FULL = dict(pairs=12, frames=7, per_background=20, examples=4, spreads=(0.5,))
QUICK = dict(pairs=4, frames=5, per_background=4, examples=2, spreads=(0.5,))
METHODS = {"gnri": dict(method="gnri"), "ddim": dict(method="ddim")}


class World:
    """The world model of one family as ComfyUI objects, and what the benchmark needs of it."""

    def __init__(self, pack, family: str, weights=None):
        from gnri_world import generate, latent, models, scenes, scorer
        self.pack, self.family = pack, family
        self.scenes, self.scorer, self.latent, self.generate = scenes, scorer, latent, generate
        self.model, self.clip = models.load(family, weights), models.text_encoder()
        self.settings = generate.SHIPPED[family]
        glue = pack.nodes.comfy_glue
        self.sigmas = glue.schedule(self.model, self.settings["steps"], self.settings["scheduler"], None)

    def positive(self, captions):
        return self.generate.conditioning(self.clip, captions)

    def invert(self, images, captions, method: str):
        """GNRI Invert's code path (cfg 1, the node's defaults for ``method``)."""
        nodes, gnri = self.pack.nodes, self.pack.gnri_core.DEFAULTS["gnri"]
        options = nodes.inversion_nodes.solver_options(method, gnri.max_iters, gnri.tol, gnri.lam)
        latent = {"samples": self.latent.encode(images, self.family)}
        _, inversion = nodes.comfy_glue.invert_latent(self.model, self.positive(captions), None, latent,
                                                      self.sigmas, 1.0, method, **options)
        return inversion

    def sample(self, noise, captions, seed: int = 0) -> torch.Tensor:
        """SamplerCustomAdvanced: CFGGuider (shipped cfg, empty negative) + euler from a NOISE."""
        import comfy.samplers
        empty = torch.zeros(len(captions), self.latent.channels(self.family), self.scenes.SIZE, self.scenes.SIZE)
        guider = comfy.samplers.CFGGuider(self.model)
        guider.set_conds(self.positive(captions), self.positive([""] * len(captions)))
        guider.set_cfg(self.settings["cfg"])
        out = guider.sample(noise.generate_noise({"samples": empty}), empty, comfy.samplers.sampler_object("euler"),
                            self.sigmas.flip(0), seed=seed, disable_pbar=True)
        return self.decode(out)

    def decode(self, samples) -> torch.Tensor:
        return self.latent.decode(samples.float().cpu(), self.family)

    def unit_noise(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space noise at sigma_max divided by the sampler's noise gain (unit if Gaussian)."""
        sampling = self.model.get_model_object("model_sampling")
        sigma = self.sigmas[-1:]
        gain = sampling.noise_scaling(sigma, torch.ones(1), torch.zeros(1), True)
        return z / gain


class RandomNoise:
    """ComfyUI's RandomNoise (``comfy.sample.prepare_noise``)."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, latent):
        import comfy.sample
        return comfy.sample.prepare_noise(latent["samples"], self.seed)


def spread_of(values) -> dict:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return {"min": float("nan"), "p10": float("nan"), "median": float("nan"), "n": 0}
    return {"min": values[0], "p10": values[int(0.1 * (len(values) - 1))], "median": statistics.median(values),
            "n": len(values)}


def switches_once(readings, first, last) -> bool:
    """readings == first* last* (a's value, then b's)."""
    k = 0
    while k < len(readings) and readings[k] == first:
        k += 1
    return all(r == last for r in readings[k:])


def interpolation(world: World, config: dict, seed: int = 100) -> dict:
    scenes, scorer = world.scenes, world.scorer
    pairs, frames = config["pairs"], config["frames"]
    a_scenes = scenes.sample_scenes(pairs, seed, rare_weight=1.0)
    b_scenes = scenes.sample_scenes(pairs, seed + 1, rare_weight=1.0)
    a_img, b_img = scenes.render_batch(a_scenes), scenes.render_batch(b_scenes)
    a_cap, b_cap = [s.caption() for s in a_scenes], [s.caption() for s in b_scenes]
    uses = world.pack.nodes.uses_nodes
    core = world.pack.gnri_core
    out, grids = {}, {}
    for name, spec in METHODS.items():
        t0 = time.perf_counter()
        inv_a, inv_b = world.invert(a_img, a_cap, spec["method"]), world.invert(b_img, b_cap, spec["method"])
        latents = uses.interpolate(world.model, inv_a, inv_b, world.positive(a_cap), world.positive(b_cap),
                                   frames)["samples"]
        images = world.decode(latents).reshape(frames, pairs, *a_img.shape[1:])
        grids[name] = images
        end = [scorer.psnr(images[0, p], a_img[p]) for p in range(pairs)]
        end += [scorer.psnr(images[-1, p], b_img[p]) for p in range(pairs)]
        readings = [[scorer.read(images[f, p])[0] for f in range(frames)] for p in range(pairs)]
        mono = {}
        for attr in ("shape", "colour", "background"):
            truth = [(getattr(a.objects[0], attr, None) if attr != "background" else a.background,
                      getattr(b.objects[0], attr, None) if attr != "background" else b.background)
                     for a, b in zip(a_scenes, b_scenes)]
            mono[attr] = sum(switches_once([getattr(r, attr) for r in readings[p]], *truth[p])
                             for p in range(pairs)) / pairs
        dist = [[float((images[f, p] - a_img[p]).pow(2).mean().sqrt()) for f in range(frames)] for p in range(pairs)]
        mono["pixels"] = sum(all(d1 >= d0 - 1e-3 for d0, d1 in zip(d, d[1:])) for d in dist) / pairs
        noise_rows = []
        for t in core.frame_weights(frames):
            z = core.slerp(inv_a.result.noise, inv_b.result.noise, t)
            noise_rows.append({"t": t, **metrics.noise_stats(world.unit_noise(z))})
        out[name] = {"end_psnr": spread_of(end), "monotonic": mono, "noise": noise_rows,
                     "seconds": round(time.perf_counter() - t0, 1)}
        if name == "gnri":
            out["gnri_lerp_noise"] = [
                {"t": t, **metrics.noise_stats(world.unit_noise(torch.lerp(inv_a.result.noise, inv_b.result.noise, t)))}
                for t in core.frame_weights(frames)]
    return out, grids, (a_img, b_img)


def rare_concept(world: World, config: dict, seed: int = 200) -> dict:
    scenes, scorer = world.scenes, world.scorer
    shape, colour = sorted(scenes.RARE)[0]
    backgrounds = [c for c in scenes.BACKGROUND_COLOURS if c != colour]
    k, n = config["examples"], config["per_background"]
    captions = [f"a {colour} {shape} on a {bg} background" for bg in backgrounds]
    examples = [scenes.from_caption(c, seed + i) for c in captions for i in range(k)]
    targets = [scenes.from_caption(c) for c in captions for _ in range(n)]
    draw_captions = [t.caption() for t in targets]
    images = scenes.render_batch(examples)
    uses = world.pack.nodes.uses_nodes
    sampling = world.model.get_model_object("model_sampling")

    def judge(generated) -> dict:
        rows = [scorer.score(img, t) for img, t in zip(generated, targets)]
        groups = generated.reshape(len(backgrounds), n, -1)
        diversity = statistics.mean(float((g[i] - g[j]).pow(2).mean().sqrt()) for g in groups
                                    for i, j in itertools.combinations(range(n), 2))
        return {"concept": sum(r["shape"] and r["colour"] for r in rows) / len(rows),
                "all": sum(all(r.values()) for r in rows) / len(rows), "diversity": diversity,
                "generations": len(rows)}

    out = {"concept": f"{colour} {shape}", "backgrounds": backgrounds, "examples_per_background": k,
           "random": judge(world.sample(RandomNoise(seed), draw_captions, seed))}
    for name, spec in METHODS.items():
        inversion = world.invert(images, [e.caption() for e in examples], spec["method"])
        groups = [dataclasses.replace(inversion, result=dataclasses.replace(
            inversion.result, noise=inversion.result.noise[i * k:(i + 1) * k])) for i in range(len(captions))]
        for spread in config["spreads"]:
            draws = [uses.ConceptNoise(group, sampling, spread, seed + i).generate_noise(
                {"samples": torch.zeros(n, *inversion.latent_shape[1:])}) for i, group in enumerate(groups)]
            out[f"{name} spread {spread}"] = judge(world.sample(FixedNoise(torch.cat(draws)), draw_captions, seed))
    return out


class FixedNoise:
    def __init__(self, noise):
        self.noise, self.seed = noise, 0

    def generate_noise(self, latent):
        return self.noise


def grid_png(grids: dict, ends, path: str, rows: int = 4, scale: int = 6) -> str:
    """Input a | frames | input b, for ``rows`` pairs, one block per method."""
    from PIL import Image
    a_img, b_img = ends
    blocks = []
    for images in grids.values():
        for p in range(min(rows, images.shape[1])):
            blocks.append(torch.cat([a_img[p], *images[:, p], b_img[p]], dim=1))
        blocks.append(torch.ones(2, blocks[-1].shape[1], 3))
    img = torch.cat(blocks[:-1]).clamp(0, 1)
    pil = Image.fromarray((img * 255).round().byte().numpy()).resize(
        (img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    pil.save(path)
    return path


def markdown(result: dict, meta: dict) -> str:
    lines = [f"# Interpolation and rare-concept seeds on the world ({meta['family']}, {meta['mode']})", "",
             f"`{meta['command']}` — {meta['seconds']:.0f} s, weights {meta['weights']}.", ""]
    for family, res in result.items():
        inter, rare = res["interpolation"], res["rare"]
        lines += [f"## {family}: interpolation ({meta['pairs']} pairs, {meta['frames']} frames)", "",
                  "| inversion | end-frame PSNR min / p10 / median (dB) | monotonic: shape | colour | background "
                  "| pixels |", "|---|---|---|---|---|---|"]
        for name in METHODS:
            e, m = inter[name]["end_psnr"], inter[name]["monotonic"]
            lines.append(f"| {name} | {e['min']:.1f} / {e['p10']:.1f} / {e['median']:.1f} | {m['shape']:.0%} | "
                         f"{m['colour']:.0%} | {m['background']:.0%} | {m['pixels']:.0%} |")
        lines += ["", "Noise at each frame, divided by the sampler's noise gain (Gaussian: std 1, "
                  "kurtosis 0, autocorrelation 0): std / excess kurtosis / lag-1 autocorrelation", "",
                  "| t | " + " | ".join(list(METHODS) + ["gnri, lerp instead of slerp"]) + " |",
                  "|---|" + "---|" * (len(METHODS) + 1)]
        rows = [inter[name]["noise"] for name in METHODS] + [inter["gnri_lerp_noise"]]
        for f in range(len(rows[0])):
            lines.append(f"| {rows[0][f]['t']:.2f} | " + " | ".join(
                f"{r[f]['std']:.3f} / {r[f]['kurtosis']:+.2f} / {r[f]['autocorr']:+.2f}" for r in rows) + " |")
        lines += ["", f"## {family}: rare concept — {rare['concept']} ({rare['examples_per_background']} examples "
                  f"per background, backgrounds {', '.join(rare['backgrounds'])})", "",
                  "| seeds | generations | scored as the concept | all attributes right | diversity (RMS) |",
                  "|---|---|---|---|---|"]
        for key, row in rare.items():
            if isinstance(row, dict):
                lines.append(f"| {key} | {row['generations']} | {row['concept']:.0%} | {row['all']:.0%} | "
                             f"{row['diversity']:.3f} |")
        lines.append("")
    for p in meta.get("plots", []):
        lines.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    config = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    out = args.out or os.path.join(RESULTS, "uses_quick" if args.quick else "uses")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    pack = env.setup()
    families = (args.world_family or "unet").split(",")
    result, plots = {}, []
    with torch.inference_mode():
        for family in families:
            world = World(pack, family)
            inter, grids, ends = interpolation(world, config)
            print(f"{family} interpolation done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            result[family] = {"interpolation": inter, "rare": rare_concept(world, config)}
            plots.append(grid_png(grids, ends, os.path.join(out, f"interpolation_{family}.png")))
            print(f"{family} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    weights = os.environ.get("GNRI_WORLD_WEIGHTS") or "gnri_world/weights"
    command = "python -m bench --uses" + (" --quick" if args.quick else "") + (
        f" --world-family {args.world_family}" if args.world_family else "")
    meta = {"mode": mode, "family": ", ".join(families), "command": command, "weights": weights,
            "seconds": time.perf_counter() - t0, "plots": plots, **config}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": result}, f, indent=1, default=str)
    text = markdown(result, meta)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0
