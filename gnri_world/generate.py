"""Text-to-image on the world models through ComfyUI's own sampling (``comfy.sample``,
what KSampler runs), and the automatic quality score of a model."""
from __future__ import annotations

import torch

from . import latent, models, scenes, scorer

SHIPPED = {"unet": dict(steps=20, cfg=5.0, sampler="euler", scheduler="normal"),
           "flux": dict(steps=20, cfg=4.0, sampler="euler", scheduler="simple")}


def conditioning(clip, captions):
    """CONDITIONING as CLIPTextEncode builds it, batched over ``captions``."""
    ctx, pooled = models.encode_text(clip, captions)
    return [[ctx, {"pooled_output": pooled}]]


def generate(model, clip, family: str, captions, seed: int = 0, steps=None, cfg=None,
             sampler=None, scheduler=None) -> torch.Tensor:
    """IMAGE [B, 16, 16, 3] for ``captions`` (shipped settings unless given)."""
    import comfy.sample
    s = SHIPPED[family]
    n = len(captions)
    empty = torch.zeros(n, latent.channels(family), scenes.SIZE, scenes.SIZE)
    noise = comfy.sample.prepare_noise(empty, seed)
    out = comfy.sample.sample(model, noise, steps or s["steps"], s["cfg"] if cfg is None else cfg,
                              sampler or s["sampler"], scheduler or s["scheduler"],
                              conditioning(clip, captions), conditioning(clip, [""] * n), empty,
                              disable_pbar=True, seed=seed)
    return latent.decode(out.float().cpu(), family)


def evaluate(model, clip, family: str, n: int = 200, seed: int = 1234, batch: int = 100, **kw) -> dict:
    """Scorer accuracy of ``n`` generations (noise seed ``seed``) from the captions of
    ``n`` scenes drawn from the training distribution (``train.DATA``) with ``seed``;
    ``kw``: sampling settings."""
    from .train import DATA
    sc = scenes.sample_scenes(n, seed, **DATA)
    imgs = torch.cat([generate(model, clip, family, [s.caption() for s in sc[i:i + batch]], seed + i, **kw)
                      for i in range(0, n, batch)])
    return scorer.accuracy(imgs, sc)


def main(argv=None):
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description="Score generations of a world model (scorer accuracy).")
    ap.add_argument("--family", choices=models.FAMILIES, required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cfg", type=float, nargs="+", default=None, help="default: the shipped cfg")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--weights", default=None, help="folder of the weights (default: the shipped ones)")
    args = ap.parse_args(argv)
    models.ensure_comfy()
    torch.set_num_threads(1)
    model, clip = models.load(args.family, args.weights), models.text_encoder()
    for cfg in args.cfg or [SHIPPED[args.family]["cfg"]]:
        t0 = time.time()
        acc = evaluate(model, clip, args.family, n=args.n, seed=args.seed, cfg=cfg, steps=args.steps,
                       sampler=args.sampler, scheduler=args.scheduler)
        print(json.dumps({"family": args.family, "n": args.n, "cfg": cfg, "steps": args.steps or SHIPPED[args.family]["steps"],
                          "sampler": args.sampler or SHIPPED[args.family]["sampler"],
                          "scheduler": args.scheduler or SHIPPED[args.family]["scheduler"],
                          **{k: round(v, 3) for k, v in acc.items()}, "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
