"""Headless demo: the reconstruction check (GNRI against ComfyUI's native FlipSigmas
inversion) run through a real ComfyUI server's HTTP API on the tiny test models.

    bash scripts/run_comfyui.sh --demo [--out FILE] [--steps N] [--iterations N] [--size PX]

No pretrained weights can be shipped, so the model is the tiny, randomly initialised
SD1.5-architecture UNet + real CLIP tokenizer from ``tests/testing_pack`` (loaded into
the server beside the pack). The "photo" is a small drawn scene turned into an SD1.5
latent with ComfyUI's own latent->RGB preview factors (``latent_rgb_factors``; the tiny
models have no VAE), written to the server's input folder and loaded with the stock
``LoadLatent`` node. The prompt is the example workflow
``gnri_reconstruction_check.json`` with tiny stand-ins for the loaders:

  native:  BasicScheduler -> FlipSigmas -> SamplerCustom(euler) inverts,
           SamplerCustom(euler, the unflipped sigmas) regenerates
  GNRI:    GNRI Invert -> SamplerCustomAdvanced(euler, its NOISE and SIGMAS) regenerates

Both reconstructions come back as .latent files (stock SaveLatent, fetched over
/view); errors are relative RMS latent errors (test pack's GNRITestLatentStats, read
from /history). Prints a table and writes a PNG: the input and each reconstruction as
ComfyUI's latent->RGB preview shows them, and under each reconstruction the mean
absolute latent difference to the input (one colour scale for all).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from comfy_server import ComfyServer

SOURCE = "a photo of a cat sitting on a wooden table next to a window, soft daylight"
INPUT_NAME = "gnri_demo_input.latent"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "gnri_demo.png"), help="PNG to write")
    p.add_argument("--steps", type=int, default=4, help="schedule steps (workflow: 4)")
    p.add_argument("--scheduler", default="sgm_uniform", help="(workflow: sgm_uniform)")
    p.add_argument("--iterations", type=int, nargs="+", default=[3, 8],
                   help="GNRI model calls per step, one GNRI branch each (default: 3 = the node's default, and 8)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8; default 256)")
    p.add_argument("--keep", action="store_true", help="keep the server's temp folder (log, outputs)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the picture

def draw_scene(px: int):
    """A small RGB scene (numpy float32 (px, px, 3) in [-1, 1]): sky, sun, hills, a house."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (px, px))
    d = ImageDraw.Draw(img)
    for y in range(px):  # sky gradient
        t = y / px
        d.line([(0, y), (px, y)], fill=(int(70 + 110 * t), int(130 + 90 * t), int(220 + 30 * t)))
    r = px * 0.11
    d.ellipse([px * 0.68 - r, px * 0.22 - r, px * 0.68 + r, px * 0.22 + r], fill=(255, 215, 80))
    d.polygon([(0, px * 0.72), (px * 0.3, px * 0.5), (px * 0.62, px * 0.74), (px, px * 0.56), (px, px), (0, px)],
              fill=(60, 150, 70))
    d.rectangle([px * 0.16, px * 0.58, px * 0.40, px * 0.82], fill=(200, 80, 60))
    d.polygon([(px * 0.13, px * 0.6), (px * 0.28, px * 0.44), (px * 0.43, px * 0.6)], fill=(110, 50, 40))
    d.rectangle([px * 0.25, px * 0.68, px * 0.31, px * 0.82], fill=(70, 40, 30))
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def rgb_factors():
    """ComfyUI's SD1.5 latent->RGB preview factors (4, 3) and bias (3,)."""
    import torch
    from comfy import latent_formats  # ComfyUI's folder is on sys.path (see main)

    fmt = latent_formats.SD15()
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=torch.float32)
    return factors, bias, fmt


def scene_latent(px: int):
    """Raw (VAE-space) SD1.5 latent (1, 4, px/8, px/8) whose latent->RGB preview is the
    scene: model-space z = least-squares solution of z @ factors + bias = rgb, plus
    seeded noise in the factors' null space (invisible in the preview)."""
    import torch

    factors, bias, fmt = rgb_factors()
    rgb = torch.from_numpy(draw_scene(px))
    rgb = torch.nn.functional.avg_pool2d(rgb.permute(2, 0, 1)[None], 8)[0].permute(1, 2, 0)  # (h, w, 3)
    z = (rgb - bias) @ torch.linalg.pinv(factors)                                            # (h, w, 4)
    null = torch.linalg.svd(factors.T).Vh[-1]                                                # (4,)
    gen = torch.Generator().manual_seed(0)
    z = z + torch.randn(z.shape[:2], generator=gen)[..., None] * 0.8 * null
    return fmt.process_out(z.permute(2, 0, 1)[None].contiguous())


def preview(raw, fmt, factors, bias):
    """ComfyUI's Latent2RGB preview of a raw latent -> uint8 (h, w, 3)."""
    import torch

    z = fmt.process_in(raw[0].float()).permute(1, 2, 0)
    rgb = ((z @ factors + bias + 1.0) / 2.0).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).numpy()


def heat(values, vmax: float):
    """(h, w) >= 0 -> uint8 (h, w, 3), black -> red -> yellow -> white at vmax."""
    import numpy as np

    t = np.clip(values / max(vmax, 1e-12), 0, 1)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
    return (rgb * 255).round().astype(np.uint8)


def figure(source, recons: list, rows: list[dict], path: str, scale: int = 8) -> None:
    """Top row: input and each reconstruction (latent->RGB preview); bottom row: the mean
    absolute latent difference to the input, one colour scale for all."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    factors, bias, fmt = rgb_factors()
    z_in = fmt.process_in(source[0].float())
    diffs = [(fmt.process_in(x[0].float()) - z_in).abs().mean(0).numpy() for x in recons]
    vmax = float(max(d.max() for d in diffs))
    h, w = source.shape[-2:]
    pw, ph, pad, label, title = w * scale, h * scale, 14, 40, 64
    cols = 1 + len(recons)
    canvas = Image.new("RGB", (cols * (pw + pad) + pad, title + 2 * (ph + label) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font, small = ImageFont.load_default(size=17), ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    draw.text((pad, 10), f"GNRI vs ComfyUI's native inversion: tiny random SD1.5 UNet, {rows[0]['steps']} "
                         "steps, regenerated with stock euler", fill=(0, 0, 0), font=font)
    draw.text((pad, 34), "top: latent->RGB preview (ComfyUI's latent_rgb_factors; the tiny models have no VAE);"
                         f" bottom: mean |latent - input| over channels, black = 0, white = {vmax:.2f}",
              fill=(60, 60, 60), font=small)

    def put(pixels, col, row, text):
        x, y = pad + col * (pw + pad), title + row * (ph + label)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)).resize((pw, ph), Image.NEAREST), (x, y))
        draw.text((x, y + ph + 4), text, fill=(0, 0, 0), font=small)

    put(preview(source, fmt, factors, bias), 0, 0, "input")
    x, y = pad, title + ph + label + 4
    lines = ["inversion model calls, error:"] + [
        f"{r['short']}: {r['calls']} calls, {r['rel_error']:.1e}" for r in rows] + [
        f"regeneration: {rows[0]['steps']} calls each", "error = RMS(diff) / RMS(input)"]
    for k, line in enumerate(lines):
        draw.text((x, y + 22 * k), line, fill=(0, 0, 0), font=small)
    for i, (recon, diff, row) in enumerate(zip(recons, diffs, rows)):
        put(preview(recon, fmt, factors, bias), i + 1, 0, f"{row['short']}: error {row['rel_error']:.1e}")
        put(heat(diff, vmax), i + 1, 1, f"{row['calls']} model calls; max |diff| {diff.max():.2g}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, optimize=True)


# ----------------------------------------------------------------------------- the prompt

def gnri_nodes(prefix: str, steps: int, scheduler: str, iterations: int) -> dict:
    """GNRI Invert -> SamplerCustomAdvanced(euler) -> stats + SaveLatent (the workflow's
    ids 20-23 with ``prefix`` = "", "1" -> 120-123 for a second setting)."""
    model = ["1", 0]
    return {
        f"{prefix}20": {"class_type": "GNRIInvert", "inputs": {
            "model": model, "positive": ["12", 0], "latent": ["11", 0], "steps": steps, "scheduler": scheduler,
            "cfg": 1.0, "method": "gnri", "iterations": iterations, "tolerance": 1e-4, "lam": 0.1,
            "sampler": "euler", "newton_form": "secant", "noise_seed": 0}},
        f"{prefix}23": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"{prefix}20", 1], "guider": ["21", 0], "sampler": ["22", 0], "sigmas": [f"{prefix}20", 2],
            "latent_image": ["11", 0]}},
        f"{prefix}71": {"class_type": "GNRITestLatentStats",
                        "inputs": {"latent_a": ["11", 0], "latent_b": [f"{prefix}23", 0]}},
        f"{prefix}73": {"class_type": "SaveLatent",
                        "inputs": {"samples": [f"{prefix}23", 0], "filename_prefix": f"gnri_demo/gnri{prefix}"}},
    }


def demo_prompt(steps: int, scheduler: str, iterations: list[int]) -> dict:
    """The reconstruction-check workflow in API format with tiny stand-ins (node ids
    follow example_workflows/gnri_reconstruction_check.json), with one GNRI branch per
    entry of ``iterations``."""
    model, clip = ["1", 0], ["1", 1]
    custom = {"add_noise": False, "noise_seed": 0, "cfg": 1.0}
    prompt = {
        "1": {"class_type": "GNRITestTinyModel", "inputs": {"family": "eps", "dtype": "fp32", "seed": 0}},
        "11": {"class_type": "LoadLatent", "inputs": {"latent": INPUT_NAME}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": SOURCE}},
        "21": {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": ["12", 0]}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "50": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps,
                                                          "denoise": 1.0}},
        "51": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["50", 0]}},
        "52": {"class_type": "SamplerCustom", "inputs": {
            **custom, "model": model, "positive": ["12", 0], "negative": ["12", 0], "sampler": ["22", 0],
            "sigmas": ["51", 0], "latent_image": ["11", 0]}},
        "53": {"class_type": "SamplerCustom", "inputs": {
            **custom, "model": model, "positive": ["12", 0], "negative": ["12", 0], "sampler": ["22", 0],
            "sigmas": ["50", 0], "latent_image": ["52", 0]}},
        "70": {"class_type": "GNRITestLatentStats", "inputs": {"latent_a": ["11", 0], "latent_b": ["53", 0]}},
        "72": {"class_type": "SaveLatent", "inputs": {"samples": ["53", 0], "filename_prefix": "gnri_demo/native"}},
    }
    for i, its in enumerate(iterations):
        prompt.update(gnri_nodes(str(i) if i else "", steps, scheduler, its))
    return prompt


def load_latent(data: bytes):
    import safetensors.torch

    return safetensors.torch.load(data)["latent_tensor"].float()


def model_calls(text: str) -> int:
    match = re.search(r"(\d+) model calls", text)
    if not match:
        raise RuntimeError(f"GNRI Invert did not report its model calls: {text!r}")
    return int(match.group(1))


def write_input(input_dir: str, size: int):
    """The scene latent as ``INPUT_NAME`` in a server's input folder; returns it."""
    import safetensors.torch
    import torch

    source = scene_latent(size)
    os.makedirs(input_dir, exist_ok=True)
    safetensors.torch.save_file({"latent_tensor": source, "latent_format_version_0": torch.tensor([])},
                                os.path.join(input_dir, INPUT_NAME))
    return source


def run_check(server, steps: int, scheduler: str, iterations: list[int]):
    """Queue the check on a running server (``.run(prompt)`` -> /history entry,
    ``.base_url``) whose input folder holds ``INPUT_NAME``; returns (rows, reconstructions)."""
    import requests

    entry = server.run(demo_prompt(steps, scheduler, iterations))
    outputs = entry["outputs"]

    def fetch(node):
        info = outputs[node]["latents"][0]
        r = requests.get(server.base_url + "/view", timeout=30,
                         params={"filename": info["filename"], "subfolder": info["subfolder"], "type": "output"})
        r.raise_for_status()
        return load_latent(r.content)

    rows = [{"name": "ComfyUI native (FlipSigmas + SamplerCustom euler)", "short": "native", "calls": steps,
             "stats": outputs["70"]["gnri_stats"][0]}]
    recons = [fetch("72")]
    for i, its in enumerate(iterations):
        prefix = str(i) if i else ""
        text = " ".join(str(t) for t in outputs.get(f"{prefix}20", {}).get("text", []))
        rows.append({"name": f"GNRI Invert ({its} iterations/step) + SamplerCustomAdvanced euler",
                     "short": f"GNRI {its} it", "calls": model_calls(text),
                     "stats": outputs[f"{prefix}71"]["gnri_stats"][0]})
        recons.append(fetch(f"{prefix}73"))
    for row in rows:
        row.update(steps=steps, rel_error=row["stats"]["rel_rms"], max_abs=row["stats"]["max_abs"])
        if not math.isfinite(row["rel_error"]):
            raise RuntimeError(f"{row['name']}: non-finite reconstruction")
    return rows, recons


def table(rows: list[dict]) -> str:
    lines = ["| inversion | steps | inversion model calls | regeneration model calls | relative error | max abs error |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['steps']} | {r['calls']} | {r['steps']} | {r['rel_error']:.2e} | {r['max_abs']:.2e} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    comfyui = os.environ.get("GNRI_COMFYUI_PATH") or os.path.join(ROOT, ".comfyui")
    if not os.path.isfile(os.path.join(comfyui, "main.py")):
        sys.exit(f"no ComfyUI at {comfyui}: run `bash scripts/run_comfyui.sh --demo` (it sets one up)")
    sys.path.insert(0, comfyui)

    base = tempfile.mkdtemp(prefix="gnri-demo-")
    source = write_input(os.path.join(base, "input"), args.size)
    print(f"Starting ComfyUI ({comfyui}) headless on 127.0.0.1 with the pack and the tiny test models ...",
          flush=True)
    server = ComfyServer.start(comfyui, base, {"ComfyUI-GNRI": ROOT,
                                               "gnri_testing_pack": os.path.join(ROOT, "tests", "testing_pack")})
    try:
        print(f"  {server.base_url} up after {time.monotonic() - started:.1f} s; queueing the reconstruction "
              f"check ({args.size}x{args.size} px, latent {args.size // 8}x{args.size // 8}) ...", flush=True)
        t0 = time.monotonic()
        rows, recons = run_check(server, args.steps, args.scheduler, args.iterations)
        run_s = time.monotonic() - t0
    finally:
        server.stop()
        if args.keep:
            print(f"  server folder kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print()
    print(table(rows))
    print("\nrelative error = RMS(reconstruction - input) / RMS(input) on the latent; model calls: GNRI's as "
          "counted by GNRI Invert (shown on the node), native euler: one per step.")
    figure(source, recons, rows, args.out)
    print(f"wrote {args.out}  (prompt ran in {run_s:.1f} s; demo total {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
