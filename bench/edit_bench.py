"""Editing benchmark with exact ground truth, on the world models (``gnri_world``).

    python -m bench --edit            # full run: bench/results/edit/ and docs/editing_grid.png
    python -m bench --edit --quick    # < 2 min: bench/results/edit_quick/
    python -m bench --edit --smoke    # a handful of pairs (tests)

Every (scene, edit) pair of ``gnri_world.scenes.sample_edits`` (colour, shape,
background, one object of two) is inverted and edited through the functions the
nodes call: GNRI Invert (``comfy_glue.invert_latent`` with the node's
``solver_options``), Attention Mask Blend (``attention_mask_blend``) and Prompt Swap
Edit (``prompt_swap_edit``), on the world's ComfyUI ModelPatchers. ComfyUI's native
inversion is BasicScheduler -> FlipSigmas -> SamplerCustom(euler) (``sample_custom``
with the stock euler sampler); its trajectory (the latent before SamplerCustom's
final ``inverse_noise_scaling``, which is inf on flow models at sigma 1) is wrapped
into an INVERSION so Prompt Swap Edit can edit it like the others.

The grid varies one axis at a time around ``DEFAULT`` (``grid``). Each pair is read
back by the world's scorer: success (the edited attribute reached), leakage (another
attribute of the scene changed), PSNR outside the true edit mask against the source,
structure IoU (equal-area boxes at the object centroids, edited vs target) and the
Attention Mask IoU against the true mask; model calls are counted per image (network
evaluations: a CFG step costs 2, however ComfyUI batches them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from . import env

RESULTS = os.path.join(env.ROOT, "bench", "results")
FAMILIES = ("unet", "flux")
CHUNK = 64          # pairs per model call (larger batches are slower per sample on CPU)
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BLUR, DILATE = 1.0, 1   # Attention Mask Blend's defaults

# pairs per family (each family its own pairs: seed SEEDS[family]); tiers: native, the
# gnri default and the real-time workflows' inversion with and without its round-trip
# check (each with and without the mask), the strength rows and the mask IoU grid run on all pairs,
# the other methods on the first method_pairs, the sweeps on the first sweep_pairs
FULL = dict(pairs=160, method_pairs=48, sweep_pairs=24, steps=4, families=FAMILIES)
QUICK = dict(pairs=8, method_pairs=8, sweep_pairs=4, steps=4, families=FAMILIES, mask_grid="middle")
SMOKE = dict(pairs=4, method_pairs=4, sweep_pairs=4, steps=3, families=FAMILIES, smoke=True, mask_grid="middle")
SEEDS = {"unet": 2026, "flux": 2027}


@dataclass(frozen=True)
class Config:
    """One inversion + edit setting (node inputs)."""
    method: str = "gnri"          # "native" or a gnri_core method
    iterations: int = 0           # 0: the method's default
    tol: float = -1.0             # -1: the default
    lam: float = -1.0             # -1: the default
    mask: str = "attention"       # none | attention | true
    blend_cfg: float = 0.0
    strength: float = 1.0
    start_step: int = 0
    edit_cfg: float = 3.0
    threshold: float = -1.0       # -1: Attention Mask Blend's default
    amb_step: int = -1
    blocks: str = "default"       # unet: attention grid target "16" (default) / "4"; flux: double blocks "0" / "1"
    newton_form: str = "secant"   # GNRI Invert's newton_form
    round_trip_check: float = -1.0  # -1: GNRI Invert's default

    def inversion_key(self):
        return (self.method, self.iterations, self.tol, self.lam, self.newton_form, self.round_trip_check)

    def mask_key(self):
        return self.inversion_key() + (self.threshold, self.amb_step, self.blocks)


DEFAULT = Config()
METHODS = [  # (label, config, tier): every inversion method at its budget
    ("native", Config(method="native"), "all"),
    ("ddim", Config(method="ddim"), "methods"),
    ("fixed_point 2", Config(method="fixed_point", iterations=2, tol=0.0), "methods"),
    ("anderson 2", Config(method="anderson", iterations=2, tol=0.0), "methods"),
    ("gnri default", DEFAULT, "all"),
    ("gnri 2", Config(iterations=2, tol=0.0, newton_form="secant_fixed_budget", round_trip_check=0.0), "methods"),
    ("gnri fixed budget, no check", Config(newton_form="secant_fixed_budget", round_trip_check=0.0), "all"),
    ("gnri real-time (fixed budget + check)", Config(newton_form="secant_fixed_budget"), "all"),
]


def grid(family: str, smoke: bool = False) -> list[tuple[str, str, Config, str]]:
    """(axis, label, config, tier): each method with and without the attention mask,
    then one axis at a time around ``DEFAULT`` (tier: which pairs run it, see FULL)."""
    rows = []
    for label, c, tier in METHODS:
        rows += [("method", f"{label}, no mask", replace(c, mask="none"), tier), ("method", label, c, tier)]
    if smoke:
        return [row for row in rows if row[1] in ("native, no mask", "native", "gnri default, no mask", "gnri default")]
    sweeps = [("default", "gnri default (sweep pairs)", DEFAULT),
              ("mask", "true mask (oracle)", replace(DEFAULT, mask="true")),
              ("mask", "attention mask, blend_cfg 6", replace(DEFAULT, blend_cfg=6.0))]
    sweeps += [("edit_cfg", f"edit_cfg {v:g}", replace(DEFAULT, edit_cfg=v)) for v in (1.0, 5.0)]
    strength = [("strength", "strength 0, no mask (reconstruction)", replace(DEFAULT, strength=0.0, mask="none"))]
    strength += [("strength", f"strength {v:g}", replace(DEFAULT, strength=v)) for v in (0.5, 1.5)]
    sweeps += [("start_step", f"start_step {v}", replace(DEFAULT, start_step=v)) for v in (1, 2)]
    sweeps += [("lam", f"lam {v:g}", replace(DEFAULT, lam=v)) for v in (0.0, 1.0, 10.0)]
    sweeps += [("threshold", f"threshold {v:g}", replace(DEFAULT, threshold=v)) for v in (0.3, 0.45, 0.75)]
    sweeps += [("amb_step", f"amb_step {v}", replace(DEFAULT, amb_step=v)) for v in (1, 99)]
    blocks = ("4",) if family == "unet" else ("0", "1")
    sweeps += [("blocks", f"blocks {v}", replace(DEFAULT, blocks=v)) for v in blocks]
    # the strength rows reuse the default's inversions: all pairs, against "gnri default"
    return rows + [(*row, "all") for row in strength] + [(*row, "sweep") for row in sweeps]


# --------------------------------------------------------------------------- world

def call_counter():
    """comfy_bench's ModelClock, also counting images per call (``per_image``), shared by
    the clones the nodes make (ModelPatcher.clone deep-copies model_options)."""
    from .comfy_bench import ModelClock

    class Shared(ModelClock):
        images = 0

        def __call__(self, apply_model, args):
            self.images += args["input"].shape[0]
            return super().__call__(apply_model, args)

        def reset(self):
            super().reset()
            self.images = 0

        def per_image(self, batch: int) -> float:
            return self.images / batch

        def __deepcopy__(self, memo):
            return self
    return Shared()


class World:
    """The world model of one family as the nodes see it: ModelPatcher (with a call
    counter), CLIP, and the pack's node modules."""

    def __init__(self, pack, family: str):
        from gnri_world import models
        self.pack, self.family = pack, family
        self.clip = models.text_encoder()
        self.clock = call_counter()
        self.model = models.load(family).clone()
        self.model.set_model_unet_function_wrapper(self.clock)
        self.glue = pack.nodes.comfy_glue
        self.amb = pack.nodes.attention_nodes
        self.edit = pack.nodes.edit_nodes
        self.inv_nodes = pack.nodes.inversion_nodes
        self.scheduler = "normal" if family == "unet" else "simple"

    def conditioning(self, captions):
        from gnri_world import generate
        return generate.conditioning(self.clip, captions)

    def sigmas(self, steps: int) -> torch.Tensor:
        return self.glue.schedule(self.model, steps, self.scheduler, None)   # ascending

    def invert(self, config: Config, x0: torch.Tensor, positive, steps: int):
        """-> (INVERSION, model calls per image)."""
        self.clock.reset()
        ascending = self.sigmas(steps)
        if config.method == "native":
            inversion = self.native(x0, positive, ascending)
        else:
            core = self.pack.gnri_core.DEFAULTS[config.method]
            options = self.inv_nodes.solver_options(
                config.method, config.iterations or core.max_iters, core.tol if config.tol < 0 else config.tol,
                core.lam if config.lam < 0 else config.lam, newton_form=config.newton_form,
                round_trip_check=None if config.round_trip_check < 0 else config.round_trip_check)
            _, inversion = self.glue.invert_latent(self.model, positive, None, {"samples": x0}, ascending, 1.0,
                                                   config.method, **options)
        return inversion, self.clock.per_image(x0.shape[0])

    def native(self, x0, positive, ascending):
        """ComfyUI's FlipSigmas + SamplerCustom(euler, add_noise off), trajectory kept."""
        import comfy.sample
        import comfy.samplers
        from comfy_extras import nodes_custom_sampler as custom
        flipped = custom.FlipSigmas.execute(ascending.flip(0).clone()).args[0]
        xs, ds = [], []

        def keep(step, denoised, x, total):
            xs.append(x.float().cpu())
            ds.append(denoised.float().cpu())
        negative = self.glue.zero_conditioning(positive)
        comfy.sample.sample_custom(self.model, torch.zeros_like(x0), 1.0, comfy.samplers.sampler_object("euler"),
                                   flipped, positive, negative, x0, callback=keep, disable_pbar=True, seed=0)
        s0, s1 = float(flipped[-2]), float(flipped[-1])
        xs.append(xs[-1] + (s1 - s0) * (xs[-1] - ds[-1]) / s0)   # the last Euler step
        core = self.pack.gnri_core
        result = core.InversionResult(noise=xs[-1], trajectory=xs, sigmas=ascending, method="native",
                                      family=self.glue.model_family(self.model), nfe=len(ds))
        return self.glue.Inversion(result=result, family=result.family, latent_shape=tuple(x0.shape),
                                   model_name=type(self.model.model).__name__,
                                   latent_format=self.model.get_model_object("latent_format"),
                                   settings=dict(method="ddim", cfg=1.0, seed=0),
                                   prediction=self.glue.prediction_type(self.model))

    @contextlib.contextmanager
    def blocks(self, value: str):
        """Attention Mask Blend's layer choice (module constants of the core's mask policy)
        for one call: the UNet grid size, or the one Flux double block to read."""
        policy = self.pack.gnri_core.attention_mask
        saved = policy.TARGET_GRID, policy.pick_blocks
        if value != "default":
            if self.family == "unet":
                policy.TARGET_GRID = int(value)
            else:
                policy.pick_blocks = lambda depth, count=0: [int(value)]
        try:
            yield
        finally:
            policy.TARGET_GRID, policy.pick_blocks = saved

    def attention_mask(self, config: Config, inversion, pairs, source, target):
        """-> ((the node's MASK output, the same and its raw attention at latent size),
        model calls per image): one Attention Mask Blend call."""
        threshold = self.pack.gnri_core.attention_mask.DEFAULT_THRESHOLD if config.threshold < 0 else config.threshold
        n = len(inversion.result.trajectory) - 1
        self.clock.reset()
        with self.blocks(config.blocks):
            out = self.amb.attention_mask_blend(self.model, self.clip, inversion, pairs[0].source_caption,
                                                pairs[0].target_caption, threshold=threshold,
                                                step=min(config.amb_step, n), source=source, target=target)
        small = [torch.nn.functional.avg_pool2d(out[k].unsqueeze(1), self.amb.image_downscale(self.model)).squeeze(1)
                 for k in ("mask", "attention")]
        return (out["mask"], *small), self.clock.per_image(len(pairs))

    def prompt_swap(self, config: Config, inversion, source, target, mask):
        self.clock.reset()
        with torch.no_grad():
            out, _notes = self.edit.prompt_swap_edit(self.model, inversion, source, target, config.strength,
                                                     config.edit_cfg, "source", config.start_step, mask,
                                                     config.blend_cfg)
        return out["samples"].float().cpu(), self.clock.per_image(inversion.latent_shape[0])

    def token_positions(self, pair):
        src, tgt = self.amb.select_positions(self.clip, pair.source_caption, pair.target_caption, "")[2:4]
        return tuple(src), tuple(tgt)


# --------------------------------------------------------------------------- scoring

def box_iou(a, b) -> float:
    """IoU of two squares of areas a[2], b[2] centred at (a[0], a[1]), (b[0], b[1])."""
    if not all(math.isfinite(v) for v in (*a, *b)) or a[2] <= 0 or b[2] <= 0:
        return 0.0
    ha, hb = math.sqrt(a[2]) / 2, math.sqrt(b[2]) / 2
    w = max(0.0, min(a[0] + ha, b[0] + hb) - max(a[0] - ha, b[0] - hb))
    h = max(0.0, min(a[1] + ha, b[1] + hb) - max(a[1] - ha, b[1] - hb))
    inter = w * h
    return inter / (a[2] + b[2] - inter)


def mask_iou(mask: torch.Tensor, truth: torch.Tensor) -> float:
    m, t = mask > 0.5, truth > 0
    union = (m | t).sum().item()
    return (m & t).sum().item() / union if union else 1.0


def score_pair(pair, image: torch.Tensor, source_image: torch.Tensor) -> dict:
    """Success, leakage, PSNR outside the true mask, structure IoU of one edited image."""
    from gnri_world import scenes, scorer
    target = pair.target
    got = scorer.read(image, len(target.objects))
    if pair.kind == "background":
        success = got[0].background == target.background and got[0].texture == target.texture
    else:
        r, o = got[pair.index], target.objects[pair.index]
        success = (r.shape == o.shape) if pair.kind == "shape" else (r.colour == o.colour)
    right = {"background": got[0].background == target.background and got[0].texture == target.texture}
    for i, (r, o) in enumerate(zip(got, target.objects)):
        right[f"shape{i}"], right[f"colour{i}"] = r.shape == o.shape, r.colour == o.colour
    edited = {"background": "background", "shape": f"shape{pair.index}",
              "colour": f"colour{pair.index}", "two_object": f"colour{pair.index}"}[pair.kind]
    leak = not all(v for k, v in right.items() if k != edited)
    _, masks = scenes.render(target)
    ious = [box_iou((r.cx, r.cy, r.area), scenes.centroid_size(m)) for r, m in zip(got, masks)]
    truth = pair.mask()
    return {"success": success, "leak": leak, "clean": success and not leak,
            "psnr_out": scorer.psnr(image, source_image, ~truth), "structure_iou": sum(ious) / len(ious)}


# --------------------------------------------------------------------------- running

def chunks(world: World, pairs) -> list[list]:
    """Pairs grouped by the token positions their edit changes (Attention Mask Blend
    takes one prompt pair per batch), at most CHUNK per group, in pair order."""
    groups: dict = {}
    for p in pairs:
        groups.setdefault(world.token_positions(p), []).append(p)
    return [g[i:i + CHUNK] for g in groups.values() for i in range(0, len(g), CHUNK)]


def take(inversion, sel: list):
    """The INVERSION of the pairs ``sel`` of a batch."""
    r = inversion.result
    result = replace(r, noise=r.noise[sel], trajectory=[t[sel] for t in r.trajectory])
    return replace(inversion, result=result, latent_shape=(len(sel), *inversion.latent_shape[1:]))


def pick(conditioning, sel: list):
    return [[t[sel], {k: (v[sel] if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}]
            for t, extra in conditioning]


class Batch:
    """One group of pairs: source images, latents, conditionings, true masks, and the
    inversions and attention masks already computed (reused by every config, sliced
    for the sweep subset)."""

    def __init__(self, world: World, pairs, rank: dict, limits: dict, steps: int):
        from gnri_world import latent, scenes
        self.world, self.pairs, self.steps = world, pairs, steps
        self.images = scenes.render_batch([p.source for p in pairs])
        self.x0 = latent.encode(self.images, world.family)
        self.source = world.conditioning([p.source_caption for p in pairs])
        self.target = world.conditioning([p.target_caption for p in pairs])
        self.truth = torch.stack([p.mask().float() for p in pairs])
        self.tiers = {tier: [i for i, p in enumerate(pairs) if rank[id(p)] < n] for tier, n in limits.items()}
        self.cache: dict = {}

    def cached(self, key, sel, compute, slicer):
        """``compute(sel)`` once per key: from the whole batch's result when there is one."""
        whole = list(range(len(self.pairs)))
        if (key, "all") in self.cache:
            value, calls = self.cache[(key, "all")]
            return (value if sel == whole else slicer(value, sel)), calls
        tag = "all" if sel == whole else len(sel)
        if (key, tag) not in self.cache:
            self.cache[(key, tag)] = compute(sel)
        return self.cache[(key, tag)]

    def inversion(self, config: Config, sel):
        return self.cached(config.inversion_key(), sel,
                           lambda s: self.world.invert(config, self.x0[s], pick(self.source, s), self.steps), take)

    def attention(self, config: Config, sel):
        def compute(s):
            inversion = self.inversion(config, s)[0]
            return self.world.attention_mask(config, inversion, [self.pairs[i] for i in s], pick(self.source, s),
                                             pick(self.target, s))
        return self.cached(config.mask_key(), sel, compute, lambda m, s: tuple(t[s] for t in m))

    def mask_rows(self, step: int, blocks: str) -> list[dict]:
        """Attention-mask IoU of the default inversion at one (step, blocks) for every
        threshold in THRESHOLDS (the node's thresholding of its raw attention output)."""
        am = self.world.pack.gnri_core.attention_mask
        sel = list(range(len(self.pairs)))
        (_, _, raw), _ = self.attention(replace(DEFAULT, amb_step=step, blocks=blocks), sel)
        rows = []
        for threshold in THRESHOLDS:
            mask, _ = am.mask_from_maps([raw], len(sel), tuple(raw.shape[1:]), threshold, BLUR, DILATE)
            for m, t, p in zip(mask, self.truth, self.pairs):
                rows.append(dict(family=self.world.family, step=step, blocks=blocks, threshold=threshold, kind=p.kind,
                                 iou=mask_iou(m, t), cover=float((m > 0.5).float().mean()),
                                 whole_iou=float((t > 0).float().mean())))
        return rows

    def run(self, axis: str, label: str, config: Config, tier: str) -> tuple[list[dict], torch.Tensor | None, list]:
        """Score rows of one config on the pairs of its tier, its edited images and masks
        (None when skipped)."""
        from gnri_world import latent
        sel = self.tiers[tier]
        if not sel:
            return [], None, None
        t0 = time.perf_counter()
        inversion, inv_calls = self.inversion(config, sel)
        masks, amb_calls = (None, None, None), 0
        if config.mask == "attention":
            masks, amb_calls = self.attention(config, sel)
        truth = self.truth[sel]
        edit_mask = {"none": None, "attention": masks[0], "true": truth}[config.mask]
        samples, edit_calls = self.world.prompt_swap(config, inversion, pick(self.source, sel),
                                                     pick(self.target, sel), edit_mask)
        edited = latent.decode(samples, self.world.family)
        seconds = (time.perf_counter() - t0) / len(sel)
        rows = []
        for j, i in enumerate(sel):
            p = self.pairs[i]
            r = score_pair(p, edited[j], self.images[i])
            small = masks[1][j] if masks[1] is not None else None
            r.update(family=self.world.family, axis=axis, label=label, kind=p.kind,
                     mask_iou=mask_iou(small, truth[j]) if small is not None else math.nan,
                     mask_cover=float((small > 0.5).float().mean()) if small is not None else math.nan,
                     whole_iou=float((truth[j] > 0).float().mean()), inv_calls_per_step=inv_calls / self.steps,
                     calls=inv_calls + amb_calls + edit_calls, seconds=seconds)
            rows.append(r)
        return rows, edited, masks[1]


def mask_settings(family: str, steps: int, only: str | None = None) -> list[tuple[int, str]]:
    """(Attention Mask Blend step, blocks) whose IoU is measured on every pair: every
    trajectory latent (``only="middle"``: the middle one) with the default layers, the
    other layers at the middle step."""
    alternatives = ("4",) if family == "unet" else ("0", "1")
    steps_shown = [-1] if only == "middle" else list(range(steps + 1))
    return [(k, "default") for k in steps_shown] + [(-1, b) for b in alternatives]


def run_family(pack, family: str, pairs, configs, steps: int, limits: dict, progress=None,
               shown: int = 0, mask_steps=None, on_group=None):
    """``limits``: pairs per tier (the first ones). -> (edit rows: one dict per (config, pair), mask rows: one per (step, blocks,
    threshold, pair), pictures: {column: images} of the first ``shown`` pairs of each group).
    ``mask_steps``: the (step, blocks) of the IoU grid (default ``mask_settings``);
    ``on_group(rows, mask_rows)`` after every group (partial results)."""
    from gnri_world import scenes
    world = World(pack, family)
    rank = {id(p): i for i, p in enumerate(pairs)}
    rows, mask_rows, pictures = [], [], {"_pairs": [], "source": [], "target": []}
    for group in chunks(world, pairs):
        batch = Batch(world, group, rank, limits, steps)
        if shown:
            pictures["_pairs"] += group[:shown]
            pictures["source"].append(batch.images[:shown])
            pictures["target"].append(scenes.render_batch([p.target for p in group[:shown]]))
        for axis, label, config, tier in configs:
            got, edited, masks = batch.run(axis, label, config, tier)
            rows += got
            if shown and tier == "all" and edited is not None:
                pictures.setdefault(label, []).append(edited[:shown])
                if masks is not None:
                    pictures.setdefault(f"{label}: mask", []).append(masks[:shown])
            if progress and got:
                progress(family, label, len(got))
        for step, blocks in mask_steps or mask_settings(family, steps):
            mask_rows += batch.mask_rows(step, blocks)
        if progress:
            progress(family, "attention-mask IoU grid", len(group))
        if on_group:
            on_group(rows, mask_rows)
    return rows, mask_rows, {k: (v if k == "_pairs" else torch.cat(v)) for k, v in pictures.items()}


# --------------------------------------------------------------------------- report

def quantile(values, q: float) -> float:
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return math.nan
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def summarise(rows) -> list[dict]:
    out, order = {}, []
    for r in rows:
        key = (r["family"], r["axis"], r["label"])
        if key not in out:
            out[key] = []
            order.append(key)
        out[key].append(r)
    table = []
    for key in order:
        rs = out[key]
        n = len(rs)
        finite = [min(r["psnr_out"], 99.0) for r in rs]
        table.append(dict(family=key[0], axis=key[1], label=key[2], n=n,
                          success=sum(r["success"] for r in rs) / n, leak=sum(r["leak"] for r in rs) / n,
                          clean=sum(r["clean"] for r in rs) / n,
                          psnr_p10=quantile(finite, 0.1), psnr_med=quantile(finite, 0.5),
                          struct_p10=quantile([r["structure_iou"] for r in rs], 0.1),
                          struct_med=quantile([r["structure_iou"] for r in rs], 0.5),
                          iou_p10=quantile([r["mask_iou"] for r in rs], 0.1),
                          iou_med=quantile([r["mask_iou"] for r in rs], 0.5),
                          cover=quantile([r["mask_cover"] for r in rs], 0.5),
                          whole_iou=quantile([r["whole_iou"] for r in rs], 0.5),
                          inv_calls=sum(r["inv_calls_per_step"] for r in rs) / n,
                          calls=sum(r["calls"] for r in rs) / n,
                          kinds={k: sum(r["success"] for r in rs if r["kind"] == k)
                                 / max(1, sum(r["kind"] == k for r in rs))
                                 for k in dict.fromkeys(r["kind"] for r in rs)}))
    return table


def fmt(v, pct=False):
    if isinstance(v, float) and math.isnan(v):
        return "–"
    return f"{100 * v:.0f}" if pct else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def markdown_table(table, family: str) -> str:
    head = ("| setting | n | success % | leakage % | success, no leak % | PSNR out p10 / med (dB) "
            "| structure IoU p10 / med | mask IoU p10 / med | mask cover | inversion calls/step | calls in all |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in table:
        if t["family"] != family:
            continue
        lines.append(f"| {t['label']} | {t['n']} | {fmt(t['success'], True)} | {fmt(t['leak'], True)} | "
                     f"{fmt(t['clean'], True)} | {fmt(t['psnr_p10'])} / {fmt(t['psnr_med'])} | "
                     f"{fmt(t['struct_p10'])} / {fmt(t['struct_med'])} | {fmt(t['iou_p10'])} / {fmt(t['iou_med'])} | "
                     f"{fmt(t['cover'], True)} | {fmt(t['inv_calls'])} | {fmt(t['calls'])} |")
    return "\n".join(lines)


def kinds_table(table, family: str) -> str:
    rows = [t for t in table if t["family"] == family and t["axis"] == "method"]
    kinds = list(rows[0]["kinds"]) if rows else []
    lines = ["| setting | " + " | ".join(f"{k} %" for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {t['label']} | " + " | ".join(fmt(t["kinds"][k], True) for k in kinds) + " |" for t in rows]
    return "\n".join(lines)


def picture_grid(pictures: dict, family: str, path: str, scale: int = 8) -> str:
    """Rows: pairs; columns (labelled): source, target, each edit (and its mask) kept."""
    import numpy as np
    from PIL import Image, ImageDraw
    cols = [k for k in pictures if not k.startswith("_")]
    tiles = [pictures[k].unsqueeze(-1).expand(-1, -1, -1, 3) if pictures[k].ndim == 3 else pictures[k] for k in cols]
    rows = [torch.cat([torch.nn.functional.pad(t[i].permute(2, 0, 1), (1, 1, 1, 1), value=1.0) for t in tiles], 2)
            for i in range(tiles[0].shape[0])]
    img = torch.cat(rows, 1).permute(1, 2, 0).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    body = Image.fromarray((img.clamp(0, 1).numpy() * 255).astype(np.uint8))
    canvas = Image.new("RGB", (body.width, body.height + 14), "white")
    canvas.paste(body, (0, 14))
    draw, width = ImageDraw.Draw(canvas), (scenes_size() + 2) * scale
    for j, k in enumerate(cols):
        draw.text((j * width + 4, 2), k.replace("gnri default", "gnri"), fill="black")
    canvas.save(path)
    with open(path[:-4] + ".txt", "w") as f:
        f.write(f"{family}: columns " + ", ".join(cols) + "\n" + "\n".join(
            f"row {i}: {p.kind}: {p.source_caption} -> {p.target_caption}" for i, p in enumerate(pictures["_pairs"])))
    return path


def scenes_size() -> int:
    from gnri_world import scenes
    return scenes.SIZE


def mask_summary(mask_rows) -> list[dict]:
    groups: dict = {}
    for r in mask_rows:
        groups.setdefault((r["family"], r["step"], r["blocks"], r["threshold"]), []).append(r)
    return [dict(family=k[0], step=k[1], blocks=k[2], threshold=k[3], n=len(rs),
                 iou_p10=quantile([r["iou"] for r in rs], 0.1), iou_med=quantile([r["iou"] for r in rs], 0.5),
                 iou_mean=sum(r["iou"] for r in rs) / len(rs), cover=quantile([r["cover"] for r in rs], 0.5),
                 whole_iou=quantile([r["whole_iou"] for r in rs], 0.5)) for k, rs in groups.items()]


def mask_table(summary, family: str) -> str:
    """Mean IoU (median in brackets) per (step, blocks) and threshold."""
    rows = [m for m in summary if m["family"] == family]
    settings = list(dict.fromkeys((m["step"], m["blocks"]) for m in rows))
    lines = ["| step, blocks | " + " | ".join(f"thr {t:g}" for t in THRESHOLDS) + " |",
             "|---|" + "---|" * len(THRESHOLDS)]
    for step, blocks in settings:
        cells = {m["threshold"]: m for m in rows if (m["step"], m["blocks"]) == (step, blocks)}
        lines.append(f"| {'middle' if step == -1 else step}, {blocks} | " + " | ".join(
            f"{cells[t]['iou_mean']:.2f} ({cells[t]['iou_med']:.2f}), cover {100 * cells[t]['cover']:.0f}%"
            for t in THRESHOLDS) + " |")
    whole = rows[0]["whole_iou"] if rows else math.nan
    return "\n".join(lines) + f"\n\nA whole-image mask scores IoU {whole:.2f} (median)."


def report(table, mask_sum, meta) -> str:
    parts = [f"# Editing benchmark ({meta['mode']})", "",
             f"`{meta['command']}` — {meta['seconds']:.0f} s wall, {meta['steps']} steps, {meta['pairs']} pairs per "
             f"family, {len(meta['families']) * meta['pairs']} in all (native, gnri default, the fixed budget with and without the check and the strength rows on all, the other methods on "
             f"the first {meta['method_pairs']}, the sweeps on the first {meta['sweep_pairs']}), torch {meta['torch']}, one process per family "
             f"with {meta['threads']} thread(s), weights: {meta['weights']}.", ""]
    for family in meta["families"]:
        parts += [f"## {family}", "", markdown_table(table, family), "",
                  "Success by edit kind (method axis):", "", kinds_table(table, family), "",
                  "Attention Mask Blend IoU against the true mask, default inversion, every pair "
                  "(mean (median), median cover):", "", mask_table(mask_sum, family), ""]
    return "\n".join(parts) + "\n"


def tiers(config: dict) -> dict:
    return {"all": config["pairs"], "methods": config["method_pairs"], "sweep": config["sweep_pairs"]}


def run_one_family(args, config, out, family) -> None:
    from gnri_world import scenes
    pack = env.setup()
    pairs = scenes.sample_edits(config["pairs"], seed=SEEDS[family])
    t_start = time.perf_counter()
    shown = 0 if args.no_plots else 2

    def progress(family, label, n):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {family} {label}: {n} pairs", file=sys.stderr, flush=True)

    def save(rows, mask_rows):
        with open(os.path.join(out, f"results_{family}.json"), "w") as f:
            json.dump({"rows": rows, "mask_rows": mask_rows, "seconds": time.perf_counter() - t_start,
                       "threads": torch.get_num_threads()}, f, default=str)
    with torch.inference_mode(False):
        rows, mask_rows, pictures = run_family(pack, family, pairs, grid(family, config.get("smoke", False)),
                                               config["steps"], tiers(config), progress, shown,
                                               mask_settings(family, config["steps"], config.get("mask_grid")), save)
    if shown:
        columns = {k: v for k, v in pictures.items() if k in ("_pairs", "source", "target") or k in PICTURED}
        picture_grid(columns, family, os.path.join(out, f"editing_{family}.png"))


def main(args) -> int:
    """One subprocess per family (they run in parallel), then the combined report
    (``--report-only``: from the per-family results already in the output folder)."""
    import subprocess
    config = SMOKE if args.smoke else QUICK if args.quick else FULL
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out or os.path.join(RESULTS, "edit" if mode == "full" else f"edit_{mode}")
    os.makedirs(out, exist_ok=True)
    if args.family:
        run_one_family(args, config, out, args.family)
        return 0
    t_start = time.perf_counter()
    if not args.report_only:
        flags = ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
        flags += ["--no-plots"] if args.no_plots else []
        procs = [subprocess.Popen([sys.executable, "-m", "bench", "--edit", "--family", f, "--out", out, *flags],
                                  cwd=env.ROOT) for f in config["families"]]
        if any(p.wait() for p in procs):
            print("edit benchmark: a family run failed", file=sys.stderr)
            return 1
    rows, mask_rows, threads, seconds = [], [], 1, 0.0
    for f in config["families"]:
        with open(os.path.join(out, f"results_{f}.json")) as fh:
            data = json.load(fh)
        rows += data["rows"]
        mask_rows += data["mask_rows"]
        threads, seconds = data["threads"], max(seconds, data["seconds"])
    meta = dict(mode=mode, command="python -m bench --edit" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[mode],
                seconds=round(seconds if args.report_only else time.perf_counter() - t_start, 1), steps=config["steps"], pairs=config["pairs"],
                method_pairs=config["method_pairs"], sweep_pairs=config["sweep_pairs"], families=list(config["families"]), torch=torch.__version__,
                threads=threads, weights=os.environ.get("GNRI_WORLD_WEIGHTS") or "shipped")
    table, mask_sum = summarise(rows), mask_summary(mask_rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "table": table, "masks": mask_sum}, f, default=str, indent=1)
    text = report(table, mask_sum, meta)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    if mode == "full" and not args.out:   # the pictures docs/editing.md shows
        import shutil
        for f in config["families"]:
            if os.path.isfile(os.path.join(out, f"editing_{f}.png")):
                shutil.copy(os.path.join(out, f"editing_{f}.png"), os.path.join(env.ROOT, "docs", f"editing_{f}.png"))
    print(text)
    print(f"wrote {out}/results.md, results.json in {meta['seconds']:.0f} s", file=sys.stderr)
    return 0


PICTURED = ("native", "ddim", "gnri default, no mask", "gnri default", "gnri default: mask")
