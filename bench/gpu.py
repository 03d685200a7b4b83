"""Speed at real scale: ``python -m bench --gpu``.

A randomly initialised network has exactly the compute of the trained one, so this
builds the full-size SDXL UNet (as SDXL-Turbo, 512x512 -> 64x64 latent, fp16) and the
full-size Flux.1-schnell transformer (1024x1024 -> 128x128 latent, bf16) with
ComfyUI's own classes and RANDOM weights, and times, through ComfyUI's sampling
(``comfy_glue.invert_latent``, what GNRI Invert runs), a 4-step inversion with every
method plus one 4-step edit (euler, another prompt), against the paper's 0.4 s
(inversion + edit) on an A100. The numbers are timings only: random weights produce
no meaningful image.

Writes bench/results/gpu.md and gpu.json (the device is named in both). Needs CUDA;
``GNRI_BENCH_GPU_DRY=1`` runs the same code on CPU with tiny configs (a check of the
code path, not a timing).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from . import env
from .methods import BY_KEY, FIXED_BUDGET, FIXED_BUDGET_CHECKED, core_options

PAPER_SECONDS = 0.4  # GNRI paper: inversion + edit, SDXL-Turbo / Flux.1-schnell, 4 steps, A100

SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64,
             'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
FLUX_SCHNELL = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
                "qkv_bias": True, "guidance_embed": False}
# tiny stand-ins for the CPU dry run
SDXL_DRY = dict(SDXL_UNET, model_channels=32, transformer_depth=[0, 0, 1, 1], channel_mult=[1, 2],
                num_res_blocks=[1, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1],
                num_head_channels=16)
FLUX_DRY = dict(FLUX_SCHNELL, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                axes_dim=[8, 12, 12], context_in_dim=64, vec_in_dim=32)

TWO_CALLS = (("fixed_point ×2", "fixed_point"), ("anderson ×2", "anderson"), ("renoise ×2", "renoise"),
             ("gnri paper, detached ×2", "gnri_paper"), ("gnri paper, autograd ×2", "gnri_autograd"),
             ("gnri secant + Euler predictor ×2", "gnri_pred"), ("gnri (default) ×2", "gnri"))
METHODS = [  # (label, method, options); the ×2 rows: exactly 2 calls per step (methods.core_options)
    ("ComfyUI FlipSigmas+euler", "native", {}),
    ("ddim", "ddim", {}),
    *[(label, BY_KEY[key].method, core_options(BY_KEY[key], 2)) for label, key in TWO_CALLS],
    ("gnri fixed budget, no check (exactly 3 calls/step)", "gnri", FIXED_BUDGET),
    ("gnri fixed budget + round-trip check (the real-time workflows)", "gnri", FIXED_BUDGET_CHECKED),
    ("gnri default (GNRI Invert: 3 calls/step, up to 8 where unconverged, + the round-trip check)", "gnri", {}),
]


def _setup(cpu: bool):
    """ComfyUI in-process (gnri_testing/comfy_env.py), without ``--cpu`` for a CUDA run."""
    os.environ["GNRI_COMFY_CPU"] = "1" if cpu else "0"
    pack = env.setup()
    import comfy.model_management
    if not cpu and comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU:
        raise SystemExit("ComfyUI was set up with --cpu in this process; run `python -m bench gpu` on its own")
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return pack


def init_random(module, dtype, device):
    """Finite random weights in place (LeCun-scaled normal, biases 0, norms 1)."""
    import torch
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                p.normal_(0.0, min(max(1.0 / math.sqrt(max(1, p[0].numel())), 0.005), 0.05))
            elif name.endswith("bias"):
                p.zero_()
            elif "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return module.to(device=device)


def build(kind: str, dry: bool):
    """(ModelPatcher, positive, target, latent) with random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    device = comfy.model_management.get_torch_device()
    g = torch.Generator().manual_seed(0)
    if kind == "sdxl":
        dtype = torch.float32 if dry else torch.float16
        cfg = comfy.supported_models.SDXL(dict(SDXL_DRY if dry else SDXL_UNET, dtype=dtype))
        cfg.set_inference_dtype(dtype, None)
        model = cfg.get_model({}, device=device)
        side = 8 if dry else 64
        channels, context, pooled = 4, (1, 77, 2048), (1, 1280)
        extra = {"width": side * 8, "height": side * 8}
    else:
        dtype = torch.float32 if dry else torch.bfloat16
        cfg = comfy.supported_models.FluxSchnell(dict(FLUX_DRY if dry else FLUX_SCHNELL, dtype=dtype))
        cfg.set_inference_dtype(dtype, None)
        model = cfg.get_model({}, device=device)
        side = 8 if dry else 128
        channels = 16
        context = (1, 256 if not dry else 8, FLUX_DRY["context_in_dim"] if dry else 4096)
        pooled = (1, FLUX_DRY["vec_in_dim"] if dry else 768)
        extra = {}
    init_random(model, dtype, device)
    patcher = comfy.model_patcher.ModelPatcher(model.eval(), load_device=device,
                                               offload_device=torch.device("cpu"))

    def cond():
        return [[torch.randn(*context, generator=g), dict(extra, pooled_output=torch.randn(*pooled, generator=g))]]
    latent = torch.randn(1, channels, side, side, generator=g)
    return patcher, cond(), cond(), latent


def time_method(pack, model, positive, target, latent, steps, label, method, options):
    import comfy.samplers
    import torch
    from comfy_extras import nodes_custom_sampler as custom

    from .comfy_bench import regenerate
    glue = pack.nodes.comfy_glue
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps).float().cpu()
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run():
        if method == "native":
            flipped = custom.FlipSigmas.execute(sigmas.clone()).args[0]
            euler = comfy.samplers.sampler_object("euler")
            inverted = custom.SamplerCustom.execute(model, False, 0, 1.0, positive, positive, euler, flipped,
                                                    {"samples": latent}).args[0]
            sync()
            t1 = time.perf_counter()
            custom.SamplerCustom.execute(model, False, 0, 1.0, target, target, euler, sigmas, inverted)
            return t1, steps, 0
        _, inversion = glue.invert_latent(model, positive, None, {"samples": latent}, sigmas.flip(0), 1.0,
                                          method, **options)
        sync()
        t1 = time.perf_counter()
        noise = glue.InvertedNoise(inversion.result.noise, float(sigmas[0]), sampling, inversion.latent_format)
        with torch.no_grad():
            regenerate(model, target, noise, latent, sigmas)
        return t1, inversion.result.nfe, inversion.result.backward_passes

    run()  # warm-up (kernels, allocator, model load)
    best = None
    for _ in range(3):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        t1, nfe, backward = run()
        sync()
        t2 = time.perf_counter()
        if best is None or t2 - t0 < best["total_s"]:
            best = {"invert_s": t1 - t0, "edit_s": t2 - t1, "total_s": t2 - t0}
    best.update(method=label, nfe=nfe, backward=backward,
                peak_gib=(torch.cuda.max_memory_allocated() / 2 ** 30) if cuda else float("nan"))
    return best


def main(args=None) -> int:
    dry = os.environ.get("GNRI_BENCH_GPU_DRY") == "1"
    if not dry:
        try:
            import torch
            ok = torch.cuda.is_available()
        except Exception:  # pragma: no cover
            ok = False
        if not ok:
            print("python -m bench --gpu needs a CUDA GPU (torch.cuda.is_available() is False here). "
                  "It times the full-size SDXL UNet and Flux.1-schnell transformer with random weights; "
                  "run it on a machine with an NVIDIA GPU (about 40 GB of GPU memory for Flux in bf16).",
                  file=sys.stderr)
            return 2
    pack = _setup(cpu=dry)
    import torch

    device = "CPU dry run (tiny configs)" if dry else torch.cuda.get_device_name(0)
    rows = []
    for kind, title in (("sdxl", "SDXL UNet (SDXL-Turbo), 512×512, fp16"),
                        ("flux", "Flux.1-schnell transformer, 1024×1024, bf16")):
        model, positive, target, latent = build(kind, dry)
        for label, method, options in METHODS:
            if kind == "flux" and options.get("gradient") == "autograd":
                continue  # ComfyUI's Flux uses in-place ops: no gradient through it
            if method not in ("native",) + tuple(pack.gnri_core.solvers.SOLVERS):
                continue
            try:
                r = time_method(pack, model, positive, target, latent, 4, label, method, options)
            except Exception as exc:  # report (e.g. out of memory) and go on
                r = {"method": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            r["model"] = title
            rows.append(r)
            print(r, file=sys.stderr, flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lines = [f"# GPU timings: 4-step inversion + one 4-step edit ({device})", "",
             "Random weights (timing only: same compute as the trained networks, no meaningful image). "
             f"The GNRI paper reports {PAPER_SECONDS} s for inversion + edit on an A100.", "",
             "| model | method | model calls | backward | inversion (s) | edit (s) | total (s) | peak GPU memory (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | — | — | — | — | {r['error']} | — |")
        else:
            lines.append(f"| {r['model']} | {r['method']} | {r['nfe']} | {r['backward']} | {r['invert_s']:.3f} | "
                         f"{r['edit_s']:.3f} | {r['total_s']:.3f} | {r['peak_gib']:.1f} |")
    text = "\n".join(lines) + "\n"
    out = getattr(args, "out", None) or os.path.join(env.ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    name = "gpu_dry" if dry else "gpu"
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)
    print(text)
    return 0
