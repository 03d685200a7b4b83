"""diffusers interop on tiny, randomly initialised diffusers models (CPU, seeded, no
downloads): the numbers behind docs/diffusers.md.

    python -m bench.diffusers_check          # after `bash scripts/test.sh` (+ pip install diffusers)

1. Cross-checks: the core's ``ddim`` through ``gnri_diffusers`` against
   diffusers' inversion (``DDIMInverseScheduler``; Euler / FlowMatchEuler: the scheduler's
   own ``step`` run backwards, model at the target timestep), and the core's
   ``reconstruct`` against diffusers' sampling loop (DDIM eta 0, Euler, FlowMatchEuler):
   max abs difference over the trajectory / of the sample, CFG 3.
2. Reconstruction: invert with gnri (adapter) or with diffusers' inversion, sample back
   with diffusers' own loop (same prompt, schedule, guidance): ||x_rec - x|| / ||x||.
3. ComfyUI vs diffusers, the same weights (when the test ComfyUI is there): one denoiser
   call and the gnri inverted noise.

The models, the reference loops and the comparisons are ``gnri_testing/diffusers_cases.py``'s.
Random networks are not contractive the way trained ones are: the numbers check the
plumbing and rank the inversions, they do not predict photo PSNR.
"""
from __future__ import annotations

import time

try:
    from gnri_testing import comfy_env  # (before anything imports comfy; optional)

    comfy_env.setup()
    HAVE_COMFY = True
except Exception as exc:  # no test ComfyUI: sections 1 and 2 only
    print(f"(ComfyUI not set up: {exc}; skipping the ComfyUI comparison)")
    HAVE_COMFY = False

import torch  # noqa: E402

from gnri_testing import diffusers_cases as cases  # noqa: E402

NAMES = {"ddim": "DDIM", "euler": "Euler", "flow": "FlowMatchEuler"}
CASE_NAMES = {"eps": "UNet eps", "v": "UNet v", "flux": "Flux", "sd3": "SD3"}


def label(case, scheduler):
    return f"{CASE_NAMES[case]}, {NAMES[scheduler]}"


def main():
    torch.set_num_threads(1)
    start = time.time()
    print(f"## Cross-checks ({cases.STEPS} steps, cfg {cases.CFG}): max abs difference, core vs diffusers\n")
    print("| model, scheduler | core `ddim` vs diffusers' inversion | `reconstruct` vs diffusers' sampling "
          "| max abs latent |")
    print("|---|---|---|---|")
    for case, scheduler in cases.CASES:
        r = cases.cross_check(case, scheduler)
        print(f"| {label(case, scheduler)} | {r['inversion']:.1e} | {r['sampling']:.1e} | {r['scale']:.1f} |")

    print("\n## Reconstruction ||x_rec - x|| / ||x||, regenerated with diffusers' own sampling loop\n")
    print("| model, scheduler | steps | cfg | diffusers' inversion | gnri (adapter) | gnri model calls |")
    print("|---|---|---|---|---|---|")
    for steps, cfg in ((10, 1.0), (10, cases.CFG), (50, 1.0)):
        for case, scheduler in cases.CASES:
            r = cases.reconstruction_errors(case, scheduler, guidance_scale=cfg, steps=steps)
            print(f"| {label(case, scheduler)} | {steps} | {cfg:g} | {r['diffusers']:.1e} | {r['gnri']:.1e} "
                  f"| {r['nfe']} |")

    if HAVE_COMFY:
        print(f"\n## ComfyUI vs diffusers, same weights ({cases.STEPS} steps, cfg {cases.CFG})\n")
        print("| model | one denoiser call, max abs diff | inverted noise (gnri), relative diff "
              "| ddim, relative diff |")
        print("|---|---|---|---|")
        for kind in ("unet", "flux"):
            r = cases.comfy_vs_diffusers(kind)
            d = cases.comfy_vs_diffusers(kind, method="ddim")
            print(f"| {'UNet eps, Euler' if kind == 'unet' else 'Flux, FlowMatchEuler'} | {r['denoised']:.1e} "
                  f"| {r['noise']:.1e} | {d['noise']:.1e} |")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
