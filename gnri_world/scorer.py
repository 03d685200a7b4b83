"""Reads a scene's attributes back from an image (imports only torch).

Background: median colour of the 1-pixel border -> nearest palette colour (striped if
every other row pair is darker).  Object: per-pixel coverage ``alpha`` = projection of
(pixel - background) on (object colour - background), object colour = median of the
pixels far from the background -> nearest object colour.  Shape from the coverage's
fill of its bounding box (square ~1, circle ~0.79, triangle ~0.5) and whether its width
grows downwards (triangle).  Two objects: each half of the image on its own.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, PALETTE, SIZE, STRIPE_SHADE, Scene

_PAL = {name: torch.tensor(PALETTE[name]) for name in PALETTE}


@dataclasses.dataclass(frozen=True)
class Reading:
    shape: str | None
    colour: str | None
    background: str
    texture: str
    area: float          # coverage sum, pixels
    cx: float
    cy: float


def _nearest(rgb: torch.Tensor, names) -> str:
    return min(names, key=lambda n: (rgb - _PAL[n]).pow(2).sum().item())


def _background(img: torch.Tensor) -> tuple[str, str, torch.Tensor]:
    border = torch.cat([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    rows = (torch.arange(SIZE) // 2) % 2 == 1
    edge_b = torch.cat([img[~rows][:, 0], img[~rows][:, -1]]).median(0).values
    edge_d = torch.cat([img[rows][:, 0], img[rows][:, -1]]).median(0).values
    striped = (edge_d - edge_b * STRIPE_SHADE).abs().max() < 0.1 and edge_b.max() - edge_d.max() > 0.15
    if striped:
        name = _nearest(edge_b, BACKGROUND_COLOURS)
        bg = torch.tensor(PALETTE[name]).expand(SIZE, SIZE, 3).clone()
        bg[rows] *= STRIPE_SHADE
        return name, "striped", bg
    name = _nearest(border.median(0).values, BACKGROUND_COLOURS)
    return name, "plain", torch.tensor(PALETTE[name]).expand(SIZE, SIZE, 3).clone()


def _object(img: torch.Tensor, bg: torch.Tensor, background: str, cols: slice) -> dict:
    """Shape, colour and coverage of the object in columns ``cols``."""
    im, b = img[:, cols], bg[:, cols]
    far = (im - b).norm(dim=-1) > 0.35
    if far.sum() < 2:
        return dict(shape=None, colour=None, area=0.0, cx=float("nan"), cy=float("nan"))
    colour = _nearest(im[far].median(0).values, [c for c in OBJECT_COLOURS if c != background])
    d = _PAL[colour] - b
    alpha = (((im - b) * d).sum(-1) / d.pow(2).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    inside = alpha > 0.5
    if inside.sum() < 2:
        return dict(shape=None, colour=colour, area=0.0, cx=float("nan"), cy=float("nan"))
    widths, heights = alpha.sum(1), alpha.sum(0)
    fill = alpha.sum().item() / (widths.max() * heights.max()).clamp_min(1e-6).item()
    rows = widths[widths > 0.5]
    third = max(1, len(rows) // 3)
    top, bottom = rows[:third].mean().item(), rows[-third:].mean().item()
    if fill > 0.86:
        shape = "square"
    elif bottom > 1.6 * top and fill < 0.72:
        shape = "triangle"
    else:
        shape = "circle"
    area = alpha.sum().item()
    c = torch.arange(im.shape[1], dtype=alpha.dtype) + 0.5 + (cols.start or 0)
    r = torch.arange(SIZE, dtype=alpha.dtype) + 0.5
    return dict(shape=shape, colour=colour, area=area,
                cx=(alpha.sum(0) * c).sum().item() / area, cy=(alpha.sum(1) * r).sum().item() / area)


def read(image: torch.Tensor, objects: int = 1) -> list[Reading]:
    """``image`` [SIZE, SIZE, 3] in [0, 1] -> one Reading per object (left to right)."""
    if tuple(image.shape) != (SIZE, SIZE, 3):
        raise ValueError(f"image: expected [{SIZE}, {SIZE}, 3], got {tuple(image.shape)}")
    img = image.float().cpu()
    background, texture, bg = _background(img)
    halves = [slice(0, SIZE)] if objects == 1 else [slice(0, SIZE // 2), slice(SIZE // 2, SIZE)]
    return [Reading(background=background, texture=texture, **_object(img, bg, background, h)) for h in halves]


def score(image: torch.Tensor, scene: Scene) -> dict:
    """Per-attribute correctness (bools) of ``image`` against ``scene``: shape, colour
    (all objects right), background (colour and texture)."""
    got = read(image, len(scene.objects))
    return {
        "shape": all(r.shape == o.shape for r, o in zip(got, scene.objects)),
        "colour": all(r.colour == o.colour for r, o in zip(got, scene.objects)),
        "background": got[0].background == scene.background and got[0].texture == scene.texture,
    }


def accuracy(images: torch.Tensor, scenes) -> dict:
    """Fraction correct per attribute over a batch [B, SIZE, SIZE, 3], plus ``all``."""
    rows = [score(im, s) for im, s in zip(images, scenes)]
    out = {k: sum(r[k] for r in rows) / max(1, len(rows)) for k in ("shape", "colour", "background")}
    out["all"] = sum(all(r.values()) for r in rows) / max(1, len(rows))
    return out


def psnr(image: torch.Tensor, reference: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """PSNR (dB, peak 1) of ``image`` to ``reference`` [H, W, 3] over pixels where ``where`` [H, W] > 0."""
    w = torch.ones(image.shape[:2]) if where is None else (where > 0).float()
    n = w.sum().item() * image.shape[-1]
    if n == 0:
        return float("nan")
    mse = ((image.float() - reference.float()).pow(2) * w[..., None]).sum().item() / n
    return float("inf") if mse == 0 else -10 * math.log10(mse)


def main(argv=None):
    """Accuracy on clean (rendered) scenes: ``python -m gnri_world.scorer --n 3000``."""
    import argparse
    import json

    from .scenes import render_batch, sample_scenes
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, kw in {"one object": {}, "two objects": {"p_two": 1.0}, "striped": {"p_striped": 1.0}}.items():
        sc = sample_scenes(args.n, args.seed, **kw)
        acc = accuracy(render_batch(sc), sc)
        print(json.dumps({"scenes": name, "n": args.n, **{k: round(v, 4) for k, v in acc.items()}}))


if __name__ == "__main__":
    main()
