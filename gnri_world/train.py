"""Train a world model (``unet`` or ``flux``) from scratch; seeded, resumable in chunks.

    python -m gnri_world.train --family unet --minutes 60            # a chunk
    python -m gnri_world.train --family unet --minutes 30 --resume   # the next chunk
    python -m gnri_world.train --family unet --export                # EMA -> weights/
    python -m gnri_world.train --family unet --minutes 30 --from-weights  # continue the shipped weights

Every step draws fresh scenes (seeded by step), encodes them with the exact "VAE" and
the shipped text encoder (10 % empty captions for CFG), and fits ComfyUI's own model
through ``BaseModel.apply_model``: EPS on SD1.5's 1000 discrete sigmas with min-SNR-5
weights (unet), flow matching with logit-normal sigmas (flux).  AdamW with warmup,
EMA of the weights; a checkpoint (``runs/<family>/ckpt.pt``) every few minutes, and
a CSV log of the loss and of the scored accuracy of EMA generations.
Uses CUDA when available (set ``--threads`` on CPU).
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import time

import torch

from . import latent, models, scenes

DATA = dict(p_two=0.15, p_striped=0.1, rare_weight=0.1)   # the training distribution
RUNS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")
DROP = 0.1
SIGMA_UNIFORM = 0.5  # flux: share of training sigmas drawn uniformly (from step 6960 on; before: 0)


class Captions:
    """Caches (context, pooled) per caption from the frozen text encoder."""

    def __init__(self, clip):
        self.clip, self.cache = clip, {}

    def __call__(self, captions, device):
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            with torch.no_grad():
                ctx, pooled = models.encode_text(self.clip, new)
            self.cache.update({c: (x, p) for c, x, p in zip(new, ctx, pooled)})
        ctx = torch.stack([self.cache[c][0] for c in captions]).to(device)
        return ctx, torch.stack([self.cache[c][1] for c in captions]).to(device)


def batch(step: int, seed: int, size: int, family: str, model, device):
    rng = random.Random(seed * 1_000_003 + step)
    sc = [scenes.sample_scene(rng, **DATA) for _ in range(size)]
    caps = ["" if rng.random() < DROP else s.caption() for s in sc]
    x0 = model.latent_format.process_in(latent.encode(scenes.render_batch(sc), family)).to(device)
    return x0, caps


def loss_fn(family: str, model, x0, ctx, pooled, gen):
    """Weighted MSE of the noise (EPS) / velocity (flow) implied by ``apply_model``."""
    ms = model.model_sampling
    noise = torch.randn(x0.shape, generator=gen, device="cpu").to(x0.device)
    b = x0.shape[0]
    if family == "unet":
        idx = torch.randint(0, len(ms.sigmas), (b,), generator=gen)
        sigma = ms.sigmas[idx].to(x0.device)
        target, weight = noise, (1 / sigma**2).clamp(max=5.0) * sigma**2   # min-SNR-5 (data std ~1)
    else:
        # half logit-normal (SD3), half uniform: sigma > 0.9 (inversion's last step) gets trained too
        logit_normal = torch.sigmoid(torch.randn(b, generator=gen))
        uniform = torch.rand(b, generator=gen)
        pick = torch.rand(b, generator=gen) < SIGMA_UNIFORM
        sigma = torch.where(pick, uniform, logit_normal).to(x0.device).clamp(1e-3, 1 - 1e-3)
        target, weight = noise - x0, torch.ones_like(sigma)
    s = sigma.view(-1, 1, 1, 1)
    x = ms.noise_scaling(sigma, noise, x0)
    extra = {"y": pooled} if family == "flux" else {}
    if family == "flux":  # ComfyUI's Flux blocks add residuals in place: save copies for backward
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
            denoised = model.apply_model(x, sigma, c_crossattn=ctx, **extra)
    else:
        denoised = model.apply_model(x, sigma, c_crossattn=ctx, **extra)
    pred = (x - denoised) / s
    return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


def patcher(model):
    import comfy.model_management
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=models.FAMILIES, required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this chunk")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=float, default=10.0, help="minutes between scored evaluations")
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--ckpt-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--from-weights", action="store_true",
                    help="start from the shipped weights (net and EMA; fresh optimiser with warmup) "
                         "when no checkpoint exists, e.g. on a machine that only has the repo")
    ap.add_argument("--export", action="store_true", help="write the EMA weights to gnri_world/weights/")
    ap.add_argument("--export-dir", default=None, help="with --export: write them here instead")
    args = ap.parse_args(argv)

    models.ensure_comfy()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = args.run_dir or os.path.join(RUNS_DIR, args.family)
    os.makedirs(run, exist_ok=True)
    ckpt_path, log_path = os.path.join(run, "ckpt.pt"), os.path.join(run, "log.csv")

    model = models.fresh(args.family, args.seed).to(device)
    net = model.diffusion_model
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, minutes = 0, 0.0
    if args.resume or args.export:
        ck = torch.load(ckpt_path, map_location=device)
        net.load_state_dict(ck["net"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, minutes = ck["step"], ck["minutes"]
    elif args.from_weights:
        shipped, meta = models.read_file(models.FILES[args.family])
        net.load_state_dict(shipped)
        ema.load_state_dict(shipped)
        step, minutes = int(meta.get("steps", 0)), float(meta.get("minutes", 0.0))
    if args.export:
        path = models.save(ema.state_dict(), models.FILES[args.family], args.export_dir,
                           meta={"config": models.CONFIGS[args.family], "steps": step, "minutes": round(minutes, 1)})
        print(f"exported EMA weights at step {step} ({minutes:.1f} min) to {path}")
        return

    if not os.path.exists(os.path.join(models.WEIGHTS_DIR, models.FILES["text"])):
        print("writing", models.save_text_encoder(seed=0))
    clip = models.text_encoder()
    caps = Captions(clip)
    gen = torch.Generator().manual_seed(args.seed * 7919 + step)
    new_log = not os.path.exists(log_path)
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "minutes", "loss", "shape", "colour", "background", "all", "device"])
    start, last_ckpt, last_eval, running = time.time(), time.time(), time.time(), []

    def save_ckpt():
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "step": step, "minutes": minutes + (time.time() - start) / 60}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    def evaluate():
        from .generate import evaluate as score_model
        emodel = copy.deepcopy(model)
        emodel.diffusion_model = ema
        with torch.no_grad():
            acc = score_model(patcher(emodel.eval()), clip, args.family, n=args.eval_n, batch=args.eval_n)
        writer.writerow([step, round(minutes + (time.time() - start) / 60, 2), "",
                         *(round(acc[k], 3) for k in ("shape", "colour", "background", "all")), device.type])
        log.flush()
        print(f"step {step}: {acc}", flush=True)

    net.train()
    while step < args.max_steps and time.time() - start < args.minutes * 60:
        x0, captions = batch(step, args.seed, args.batch, args.family, model, device)
        ctx, pooled = caps(captions, device)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = loss_fn(args.family, model, x0, ctx, pooled, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - decay)
        running.append(loss.item())
        if step % 50 == 0:
            writer.writerow([step, round(minutes + (time.time() - start) / 60, 2),
                             round(sum(running) / len(running), 5), "", "", "", "", device.type])
            log.flush()
            print(f"step {step} loss {sum(running) / len(running):.4f} "
                  f"{(time.time() - start) / 60:.1f} min", flush=True)
            running = []
        if time.time() - last_ckpt > args.ckpt_every * 60:
            save_ckpt()
            last_ckpt = time.time()
        if args.eval_every > 0 and time.time() - last_eval > args.eval_every * 60:
            try:
                evaluate()
            except Exception as e:  # an evaluation bug must not cost the run
                print(f"evaluation failed: {e!r}", flush=True)
            last_eval = time.time()
    save_ckpt()
    if args.eval_every > 0:
        evaluate()
    log.close()


if __name__ == "__main__":
    main()
