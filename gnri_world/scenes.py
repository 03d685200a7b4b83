"""A tiny captioned world with exact ground truth (imports only torch).

A scene is one or two flat-coloured shapes (circle, square, triangle) on a plain or
striped background; ``render`` draws it antialiased (4x supersampled) at 16x16 and
returns the per-object coverage masks.  Captions name shapes and colours only
("a red circle on a blue background"); size and position vary freely and are read
back by the scorer.  Everything is deterministic by seed.

Rare concepts: ``RARE`` combinations (a yellow triangle) are sampled ``rare_weight``
times as often as the others (0.1 by default, 0 to hold them out).
"""
from __future__ import annotations

import dataclasses
import math
import random
import re

import torch

SIZE = 16          # image side in pixels (= latent side: the "VAE" does not downsample)
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
OBJECT_COLOURS = ("red", "green", "blue", "yellow")
BACKGROUND_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
TEXTURES = ("plain", "striped")
PALETTE = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.15), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
}
STRIPE_SHADE = 0.6  # striped backgrounds: every other pair of rows darkened by this factor
RARE = frozenset({("triangle", "yellow")})
SINGLE_SIZE = (8.0, 12.0)   # object extent range (pixels), one object
PAIR_SIZE = (6.0, 7.5)      # each of two objects (left and right halves)
JITTER = 2.0                # centre offset range (pixels), one object


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: float = 10.0      # extent in pixels (diameter / side / triangle base and height)
    cx: float = 8.0         # centre, pixels (0..SIZE)
    cy: float = 8.0


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"
    texture: str = "plain"

    def caption(self) -> str:
        things = " and ".join(f"a {o.colour} {o.shape}" for o in self.objects)
        bg = f"{self.background} striped" if self.texture == "striped" else self.background
        return f"{things} on a {bg} background"

    def replace_object(self, i: int, **changes) -> "Scene":
        objs = list(self.objects)
        objs[i] = dataclasses.replace(objs[i], **changes)
        return dataclasses.replace(self, objects=tuple(objs))


def _coverage(obj: Obj) -> torch.Tensor:
    """Exact-ish (4x4 supersampled) coverage of ``obj`` on the SIZE x SIZE grid."""
    n = SIZE * SUPERSAMPLE
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(c, c, indexing="ij")
    dx, dy, h = x - obj.cx, y - obj.cy, obj.size / 2
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= h * h
    elif obj.shape == "square":
        inside = (dx.abs() <= h) & (dy.abs() <= h)
    elif obj.shape == "triangle":  # apex up, base at the bottom
        frac = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & (dx.abs() <= frac * h)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {obj.shape!r}")
    return inside.double().reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(dim=(1, 3)).float()


def background_image(background: str, texture: str = "plain") -> torch.Tensor:
    """[SIZE, SIZE, 3] background in [0, 1]."""
    img = torch.tensor(PALETTE[background]).expand(SIZE, SIZE, 3).clone()
    if texture == "striped":
        rows = (torch.arange(SIZE) // 2) % 2 == 1
        img[rows] *= STRIPE_SHADE
    elif texture != "plain":
        raise ValueError(f"texture: expected one of {TEXTURES}, got {texture!r}")
    return img


def render(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image [SIZE, SIZE, 3] in [0, 1], coverage masks [n_objects, SIZE, SIZE] in [0, 1]).
    Later objects are drawn over earlier ones; masks are what stays visible."""
    img = background_image(scene.background, scene.texture)
    masks = []
    for obj in scene.objects:
        a = _coverage(obj)
        masks = [m * (1 - a) for m in masks] + [a]
        img = img * (1 - a[..., None]) + torch.tensor(PALETTE[obj.colour]) * a[..., None]
    return img, torch.stack(masks)


def render_batch(scenes) -> torch.Tensor:
    """[B, SIZE, SIZE, 3] images (ComfyUI's IMAGE layout)."""
    return torch.stack([render(s)[0] for s in scenes])


def edit_mask(source: Scene, target: Scene) -> torch.Tensor:
    """[SIZE, SIZE] bool: pixels whose rendering differs between the two scenes."""
    return (render(source)[0] - render(target)[0]).abs().amax(-1) > 1e-6


def _pick_object(rng: random.Random, rare_weight: float, exclude_colour: str | None = None):
    combos = [(s, c) for s in SHAPES for c in OBJECT_COLOURS if c != exclude_colour]
    weights = [rare_weight if sc in RARE else 1.0 for sc in combos]
    return rng.choices(combos, weights)[0]


def _place(rng: random.Random, picks) -> list[Obj]:
    """Objects for (shape, colour) ``picks`` with random size and position: one object
    near the centre, two in the left and right halves."""
    if len(picks) == 1:
        (shape, colour), = picks
        return [Obj(shape, colour, rng.uniform(*SINGLE_SIZE),
                    8.0 + rng.uniform(-JITTER, JITTER), 8.0 + rng.uniform(-JITTER, JITTER))]
    objs = []
    for (shape, colour), cx in zip(picks, (4.0, 12.0)):
        size = rng.uniform(*PAIR_SIZE)
        objs.append(Obj(shape, colour, size, cx + rng.uniform(-0.5, 0.5), 8.0 + rng.uniform(-2, 2)))
    return objs


def sample_scene(rng: random.Random, p_two: float = 0.0, p_striped: float = 0.0,
                 rare_weight: float = 0.1) -> Scene:
    """One random scene from ``rng``; the background colour differs from every object's."""
    if rng.random() < p_two:
        objs = _place(rng, [_pick_object(rng, rare_weight), _pick_object(rng, rare_weight)])
    else:
        objs = _place(rng, [_pick_object(rng, rare_weight)])
    used = {o.colour for o in objs}
    background = rng.choice([c for c in BACKGROUND_COLOURS if c not in used])
    striped = rng.random() < p_striped and background != "black"  # black stripes are invisible
    texture = "striped" if striped else "plain"
    return Scene(tuple(objs), background, texture)


_CAPTION = re.compile(r"^a (\w+) (\w+)(?: and a (\w+) (\w+))? on an? (\w+)( striped)? background$")


def from_caption(caption: str, seed: int = 0) -> Scene:
    """The scene a caption names ("a red circle [and a blue square] on a white [striped]
    background"); sizes and positions random from ``seed``."""
    m = _CAPTION.match(caption.strip().lower())
    bad = m is None or any(c not in OBJECT_COLOURS for c in m.group(1, 3) if c) or \
        any(s not in SHAPES for s in m.group(2, 4) if s) or m.group(5) not in BACKGROUND_COLOURS
    if bad:
        raise ValueError(f"caption: expected 'a <colour> <shape> [and a <colour> <shape>] on a <colour> "
                         f"[striped] background' with colours {OBJECT_COLOURS} (background also white, "
                         f"black) and shapes {SHAPES}, got {caption!r}")
    picks = [(m.group(2), m.group(1))] + ([(m.group(4), m.group(3))] if m.group(3) else [])
    return Scene(tuple(_place(random.Random(int(seed)), picks)), m.group(5), "striped" if m.group(6) else "plain")


def sample_scenes(n: int, seed: int, **kw) -> list[Scene]:
    """``n`` scenes, deterministic by ``seed`` (keywords: see ``sample_scene``)."""
    rng = random.Random(int(seed))
    return [sample_scene(rng, **kw) for _ in range(int(n))]


# ---- edit pairs: (source scene, target scene, target caption, true edit mask) ----

EDIT_KINDS = ("colour", "shape", "background", "two_object")


@dataclasses.dataclass(frozen=True)
class EditPair:
    kind: str
    source: Scene
    target: Scene
    index: int | None = None   # the edited object (None: background)

    @property
    def source_caption(self) -> str:
        return self.source.caption()

    @property
    def target_caption(self) -> str:
        return self.target.caption()

    def mask(self) -> torch.Tensor:
        return edit_mask(self.source, self.target)


def make_edit(scene: Scene, kind: str, rng: random.Random) -> EditPair:
    """Change one attribute of ``scene``: ``colour`` / ``shape`` of object 0 (of a random
    one of two for ``two_object``, which needs a two-object scene), or ``background``."""
    if kind == "background":
        used = {o.colour for o in scene.objects} | {scene.background}
        new = rng.choice([c for c in BACKGROUND_COLOURS if c not in used])
        return EditPair(kind, scene, dataclasses.replace(scene, background=new))
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind: expected one of {EDIT_KINDS}, got {kind!r}")
    if kind == "two_object" and len(scene.objects) != 2:
        raise ValueError("kind 'two_object' needs a scene with two objects")
    i = rng.randrange(len(scene.objects)) if kind == "two_object" else 0
    obj = scene.objects[i]
    if kind == "shape":
        return EditPair(kind, scene, scene.replace_object(i, shape=rng.choice([s for s in SHAPES if s != obj.shape])), i)
    taken = {scene.background} | {o.colour for o in scene.objects}
    return EditPair(kind, scene, scene.replace_object(i, colour=rng.choice([c for c in OBJECT_COLOURS if c not in taken])), i)


def sample_edits(n: int, seed: int, kinds=EDIT_KINDS, rare_weight: float = 0.1) -> list[EditPair]:
    """``n`` edit pairs cycling through ``kinds``, deterministic by ``seed``."""
    rng = random.Random(int(seed))
    out = []
    for k in range(int(n)):
        kind = kinds[k % len(kinds)]
        scene = sample_scene(rng, p_two=1.0 if kind == "two_object" else 0.0, rare_weight=rare_weight)
        out.append(make_edit(scene, kind, rng))
    return out


def centroid_size(mask: torch.Tensor) -> tuple[float, float, float]:
    """(cx, cy, area) of a coverage mask, pixels."""
    area = mask.sum().item()
    if area <= 0:
        return (math.nan, math.nan, 0.0)
    c = torch.arange(SIZE, dtype=mask.dtype) + 0.5
    return ((mask.sum(0) * c).sum().item() / area, (mask.sum(1) * c).sum().item() / area, area)
