"""Headless demo: a real text-based edit of a real image on the pack's trained world
models, through a real ComfyUI server's HTTP API, GNRI beside ComfyUI's native inversion.

    bash scripts/run_comfyui.sh --demo [--out FILE] [--family unet|flux] [--seed N]

The image is a scene of the pack's small world ("a red circle on a blue background",
16x16 world pixels shown at 8 px each), drawn by the test pack's GNRI World Scene node;
the models are the world's trained SD1.5-type UNet (EPS) or Flux-type DiT (flow),
loaded with GNRI World Loader, with their exact linear "VAE" (GNRI World Encode /
Decode) and the shipped text encoder through the stock CLIPTextEncode (see
docs/world.md). The prompt:

  GNRI:    GNRI Invert -> Attention Mask Blend (source vs target prompt) ->
           Prompt Swap Edit (target prompt, the mask) -> decode
  native:  BasicScheduler -> FlipSigmas -> SamplerCustom(euler, source prompt) inverts,
           SamplerCustom(euler, target prompt, the unflipped sigmas) edits (UNet only:
           with Flux's sigma_max = 1 the native inversion returns inf)

and, for each, the reconstruction (the same path with the source prompt). GNRI World
Score reads each result back: the edited attribute and the background PSNR outside
the true object mask. Prints a table and writes a PNG.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repo root, for gnri_testing
from gnri_testing.comfy_server import ComfyServer  # noqa: E402

SOURCE = "a red circle on a blue background"
TARGET = "a yellow circle on a blue background"
SETTINGS = {  # per family: schedule, inversion and edit settings of the demo
    "unet": dict(steps=20, scheduler="normal", edit_cfg=4.0, threshold=0.3),
    "flux": dict(steps=20, scheduler="simple", edit_cfg=4.0, threshold=0.3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "gnri_demo.png"), help="PNG to write")
    p.add_argument("--family", choices=list(SETTINGS), default="unet")
    p.add_argument("--seed", type=int, default=0, help="layout (size, position) of the scene")
    p.add_argument("--source", default=SOURCE)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--keep", action="store_true", help="keep the server's temp folder (log, outputs)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the prompt

def edit_prompt(family: str, source: str, target: str, seed: int = 0, native: bool | None = None,
                **overrides) -> dict:
    """API-format prompt: scene -> GNRI (and, for the UNet, native) inversion -> edit and
    reconstruction -> decode -> score + SaveImage.  Output nodes: ``score/<branch>``,
    ``save/<branch>`` with branch in ``gnri_edit, gnri_recon[, native_edit, native_recon]``;
    ``save/source`` (the scene), ``mask`` (Attention Mask Blend's mask, via SaveImage)."""
    s = dict(SETTINGS[family], **overrides)
    native = family == "unet" if native is None else native
    model, clip = ["loader", 0], ["loader", 1]
    p = {
        "loader": {"class_type": "GNRIWorldLoader", "inputs": {"family": family}},
        "scene": {"class_type": "GNRIWorldScene", "inputs": {"seed": seed, "caption": source}},
        "encode": {"class_type": "GNRIWorldEncode", "inputs": {"pixels": ["scene", 0], "family": family}},
        "src": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": source}},
        "tgt": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": target}},
        "invert": {"class_type": "GNRIInvert", "inputs": {
            "model": model, "positive": ["src", 0], "latent": ["encode", 0], "steps": s["steps"],
            "scheduler": s["scheduler"], "cfg": 1.0, "method": "gnri", "iterations": 3, "tolerance": 1e-4,
            "lam": 0.1, "sampler": "euler", "newton_form": "secant", "noise_seed": 0}},
        "attn": {"class_type": "GNRIAttentionMaskBlend", "inputs": {
            "model": model, "clip": clip, "inversion": ["invert", 3], "source_prompt": source,
            "target_prompt": target, "threshold": s["threshold"], "blur": 0.0, "dilate": 0, "step": -1}},
        "mask_image": {"class_type": "MaskToImage", "inputs": {"mask": ["attn", 0]}},
        "mask": {"class_type": "SaveImage", "inputs": {"images": ["mask_image", 0], "filename_prefix": "demo/mask"}},
        "save/source": {"class_type": "SaveImage", "inputs": {"images": ["scene", 0], "filename_prefix": "demo/src"}},
    }

    def swap(cond, strength, mask):
        inputs = {"model": model, "inversion": ["invert", 3], "source": ["src", 0], "target": [cond, 0],
                  "strength": strength, "edit_cfg": s["edit_cfg"], "negative_mode": "source", "start_step": 0}
        return {"class_type": "GNRIPromptSwapEdit", "inputs": dict(inputs, mask=mask) if mask else inputs}

    branches = {"gnri_edit": swap("tgt", 1.0, ["attn", 0]), "gnri_recon": swap("src", 0.0, None)}
    if native:
        p.update({
            "sigmas": {"class_type": "BasicScheduler", "inputs": {
                "model": model, "scheduler": s["scheduler"], "steps": s["steps"], "denoise": 1.0}},
            "flip": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sigmas", 0]}},
            "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "native_invert": {"class_type": "SamplerCustom", "inputs": {
                "model": model, "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["src", 0],
                "negative": ["src", 0], "sampler": ["euler", 0], "sigmas": ["flip", 0],
                "latent_image": ["encode", 0]}},
        })
        for name, cond, cfg in (("native_edit", "tgt", s["edit_cfg"]), ("native_recon", "src", 1.0)):
            branches[name] = {"class_type": "SamplerCustom", "inputs": {
                "model": model, "add_noise": False, "noise_seed": 0, "cfg": cfg, "positive": [cond, 0],
                "negative": ["src", 0], "sampler": ["euler", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["native_invert", 0]}}
    for name, node in branches.items():
        caption = target if name.endswith("edit") else source
        p[name] = node
        p[f"decode/{name}"] = {"class_type": "GNRIWorldDecode", "inputs": {"samples": [name, 0], "family": family}}
        p[f"score/{name}"] = {"class_type": "GNRIWorldScore", "inputs": {
            "image": [f"decode/{name}", 0], "caption": caption, "reference": ["scene", 0], "mask": ["scene", 1]}}
        p[f"save/{name}"] = {"class_type": "SaveImage", "inputs": {
            "images": [f"decode/{name}", 0], "filename_prefix": f"demo/{name}"}}
    return p


def branch_names(prompt: dict) -> list[str]:
    return [k[len("score/"):] for k in prompt if k.startswith("score/")]


def run_edit(server, family: str, source: str, target: str, seed: int = 0, **overrides):
    """Queue ``edit_prompt`` on a running server; returns (rows, images {name: PIL image})."""
    import requests
    from PIL import Image

    prompt = edit_prompt(family, source, target, seed, **overrides)
    outputs = server.run(prompt, timeout=300)["outputs"]

    def fetch(node):
        info = outputs[node]["images"][0]
        r = requests.get(server.base_url + "/view", timeout=30,
                         params={"filename": info["filename"], "subfolder": info["subfolder"], "type": "output"})
        r.raise_for_status()
        return Image.open(io.BytesIO(r.content)).convert("RGB")

    rows = []
    for name in branch_names(prompt):
        score = outputs[f"score/{name}"]["gnri_world"][0]
        rows.append({"name": name, "caption": target if name.endswith("edit") else source,
                     "correct": score["correct"][0], "psnr_outside": score["psnr_outside"][0]})
    images = {name: fetch(f"save/{name}") for name in ["source", *branch_names(prompt)]}
    images["mask"] = fetch("mask")
    calls = " ".join(str(t) for t in outputs.get("invert", {}).get("text", []))
    return rows, images, calls


def table(rows: list[dict]) -> str:
    lines = ["| result | prompt | shape / colour / background right | PSNR outside the object (dB) |",
             "|---|---|---|---|"]
    for r in rows:
        c = r["correct"]
        lines.append(f"| {r['name']} | {r['caption']} | {'/'.join('yes' if c[k] else 'no' for k in ('shape', 'colour', 'background'))}"
                     f" | {r['psnr_outside']:.1f} |")
    return "\n".join(lines)


def figure(images: dict, rows: list[dict], path: str, title: str) -> None:
    """One row: source, attention mask, then each result with its score."""
    from PIL import Image, ImageDraw, ImageFont

    names = ["source", "mask"] + [r["name"] for r in rows]
    tile, pad, top, label = 128, 12, 40, 44
    try:
        font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    width = max(pad + len(names) * (tile + pad), 2 * pad + int(font.getlength(title)))
    canvas = Image.new("RGB", (width, top + tile + label), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 10), title, fill=(0, 0, 0), font=font)
    by_name = {r["name"]: r for r in rows}
    for i, name in enumerate(names):
        x = pad + i * (tile + pad)
        canvas.paste(images[name].resize((tile, tile), Image.NEAREST), (x, top))
        draw.rectangle([x - 1, top - 1, x + tile, top + tile], outline=(120, 120, 120))
        text = {"source": "source image", "mask": "attention mask"}.get(name, name.replace("_", " "))
        draw.text((x, top + tile + 4), text, fill=(0, 0, 0), font=small)
        if name in by_name:
            r = by_name[name]
            ok = "right" if all(r["correct"].values()) else "wrong"
            draw.text((x, top + tile + 20), f"{ok}; bg PSNR {r['psnr_outside']:.0f} dB", fill=(60, 60, 60), font=small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, optimize=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    comfyui = os.environ.get("GNRI_COMFYUI_PATH") or os.path.join(ROOT, ".comfyui")
    if not os.path.isfile(os.path.join(comfyui, "main.py")):
        sys.exit(f"no ComfyUI at {comfyui}: run `bash scripts/run_comfyui.sh --demo` (it sets one up)")

    base = tempfile.mkdtemp(prefix="gnri-demo-")
    print(f"Starting ComfyUI ({comfyui}) headless on 127.0.0.1 with the pack and the world models ...", flush=True)
    server = ComfyServer.start(comfyui, base, {"ComfyUI-GNRI": ROOT,
                                               "gnri_testing_pack": os.path.join(ROOT, "tests", "testing_pack")})
    try:
        print(f"  {server.base_url} up after {time.monotonic() - started:.1f} s; editing "
              f"'{args.source}' -> '{args.target}' on the world {args.family} ...", flush=True)
        t0 = time.monotonic()
        rows, images, calls = run_edit(server, args.family, args.source, args.target, args.seed)
        run_s = time.monotonic() - t0
    finally:
        server.stop()
        if args.keep:
            print(f"  server folder kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print()
    print(table(rows))
    print(f"\nGNRI Invert: {calls}")
    print("edit = target prompt; recon = source prompt (reconstruction); PSNR on 16x16 world pixels, "
          "outside the true object mask, against the source image.")
    figure(images, rows, args.out, f"'{args.source}' -> '{args.target}' (world {args.family}, "
                                   f"{SETTINGS[args.family]['steps']} steps): GNRI vs ComfyUI's native inversion")
    print(f"wrote {args.out}  (prompt ran in {run_s:.1f} s; demo total {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
