"""Template-browser thumbnails: example_workflows/<name>.jpg next to each workflow.

ComfyUI's frontend (1.32.9) requests ``/api/workflow_templates/<pack>/<name>.jpg`` for
each custom-node template and shows the file name as the card's title. Each
thumbnail is a diagram of the workflow (model, pipeline); with ``--render NAME=IMAGE``
a rendered result (e.g. input | edit from a real model) fills the card's lower half.

    python scripts/thumbnails.py                       # rewrites all thumbnails
    python scripts/thumbnails.py --render "GNRI - SD1.5 invert, reconstruct, edit=out.png"
"""
from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
SIZE = 512
BACKGROUND, BOX, ACCENT, TEXT, MUTED = "#1e1f24", "#34363f", "#4f9dde", "#f2f2f2", "#a9adb8"

CARDS = {
    "GNRI - SD1.5 invert, reconstruct, edit": (
        "Invert, reconstruct, edit", "SD1.5 / SD2.1 · 50 steps",
        ["Your photo", "GNRI Invert", "Prompt Swap Edit", "Edited photo"]),
    "GNRI - SDXL-Turbo real-time edit": (
        "Real-time edit", "SDXL-Turbo · 4 steps",
        ["Your photo", "GNRI Invert", "Attention Mask Blend", "Prompt Swap Edit"]),
    "GNRI - Flux.1-schnell real-time edit": (
        "Real-time edit", "Flux.1-schnell · 4 steps",
        ["Your photo", "GNRI Invert", "Attention Mask Blend", "Prompt Swap Edit"]),
    "GNRI - Reconstruction check": (
        "Reconstruction check", "GNRI vs ComfyUI's native inversion",
        ["Your photo", "Native inversion | GNRI Invert", "Regenerate both", "input | native | GNRI"]),
    "GNRI - SD1.5 interpolate two photos": (
        "Interpolate two photos", "SD1.5 · exact inversion of both",
        ["Photo A | Photo B", "GNRI Invert (both)", "GNRI Interpolate", "Frames A → B"]),
    "GNRI - SD1.5 concept from examples": (
        "Rare concept from examples", "SD1.5 · seeds near inverted examples",
        ["Example photos", "GNRI Invert", "GNRI Concept Noise", "New samples"]),
}


def font(size: int):
    return ImageFont.load_default(size=size)


def card(title: str, subtitle: str, steps: list[str], render: str | None = None) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, SIZE, 8], fill=ACCENT)
    draw.text((28, 30), "GNRI", font=font(22), fill=ACCENT)
    draw.text((28, 62), title, font=font(38), fill=TEXT)
    draw.text((28, 112), subtitle, font=font(22), fill=MUTED)
    top, bottom = 160, SIZE - 24
    if render:
        shot = Image.open(render).convert("RGB")
        shot.thumbnail((SIZE - 56, (bottom - top) // 2))
        image.paste(shot, ((SIZE - shot.width) // 2, bottom - shot.height))
        bottom -= shot.height + 16
    step_h = min(80, (bottom - top) // len(steps))
    for i, step in enumerate(steps):
        y = top + i * step_h
        draw.rounded_rectangle([28, y, SIZE - 28, y + step_h - 20], radius=10, fill=BOX,
                               outline=ACCENT if "GNRI" in step else BOX, width=2)
        draw.text((46, y + (step_h - 20) // 2), step, font=font(22), fill=TEXT, anchor="lm")
        if i < len(steps) - 1:
            x = SIZE // 2
            draw.polygon([(x - 8, y + step_h - 18), (x + 8, y + step_h - 18), (x, y + step_h - 4)], fill=MUTED)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="append", default=[], metavar="NAME=IMAGE",
                        help="a rendered result to show on NAME's card")
    args = parser.parse_args(argv)
    renders = dict(r.split("=", 1) for r in args.render)
    for name, (title, subtitle, steps) in CARDS.items():
        path = os.path.join(WORKFLOW_DIR, f"{name}.jpg")
        card(title, subtitle, steps, renders.get(name)).save(path, quality=88)
        print("wrote", os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main()
