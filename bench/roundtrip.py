"""Round trip on the tiny ComfyUI test models: invert with each method through the
pack's GNRI Invert node, regenerate with ComfyUI's stock SamplerCustomAdvanced +
euler from the NOISE output, and compare with ComfyUI's native inversion
(BasicScheduler -> FlipSigmas -> SamplerCustom euler, then SamplerCustom euler back).

    python -m bench.roundtrip            # prints a markdown table

(Kept as a quick check through the GNRI Invert node itself; the benchmark proper is
``python -m bench``, see bench/run.py.)

Reports the relative reconstruction error ||x_rec - x|| / ||x|| of the latent and
the model calls of the inversion. Random tiny models: harder to invert than trained
ones (not contractive), so the numbers rank methods, they do not predict photo PSNR.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import comfy_env  # noqa: E402

comfy_env.setup()
import torch  # noqa: E402

import comfy.samplers  # noqa: E402
from comfy_extras import nodes_custom_sampler as custom  # noqa: E402
import tiny_models  # noqa: E402

CASES = [("ddim", 1, "secant"), ("fixed_point", 2, "secant"), ("anderson", 2, "secant"),
         ("renoise", 2, "secant"), ("newton", 2, "paper_detached"),
         ("gnri", 2, "paper_detached"), ("gnri", 2, "paper_autograd"), ("gnri", 2, "secant"),
         ("gnri", 4, "secant"), ("gnri", 8, "secant")]


def load_pack():
    spec = importlib.util.spec_from_file_location(
        "gnri_pack", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["gnri_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def family_setup(family):
    model = tiny_models.tiny_model(family)
    if family == "flow":
        positive = tiny_models.flux_conditioning(1, seed=0)
    else:
        clip = tiny_models.tiny_clip()
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat on a sofa"))
    samples = tiny_models.random_latent("flow" if family == "flow" else "eps", 1, 16, 16, seed=0)
    return model, positive, {"samples": samples}


def regenerate(model, positive, noise, latent, sigmas):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    return guider.sample(noise.generate_noise(latent), latent["samples"],
                         comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True)


def native_roundtrip(model, positive, latent, steps):
    sigmas = custom.BasicScheduler.execute(model, "simple", steps, 1.0).args[0]
    flipped = custom.FlipSigmas.execute(sigmas).args[0]
    euler = comfy.samplers.sampler_object("euler")
    inverted = custom.SamplerCustom.execute(model, False, 0, 1.0, positive, positive, euler,
                                            flipped, latent).args[0]
    back = custom.SamplerCustom.execute(model, False, 0, 1.0, positive, positive, euler,
                                        sigmas, inverted).args[0]
    return back["samples"]


def relative_error(x, ref):
    err = float((x - ref).norm() / ref.norm())
    return err if err == err and err != float("inf") else float("inf")


def main():
    pack = load_pack()
    invert_node = pack.nodes.inversion_nodes.GNRIInvert
    rows = []
    for family in ("eps", "v", "flow"):
        model, positive, latent = family_setup(family)
        for steps in (4, 10):
            native = native_roundtrip(model, positive, latent, steps)
            rows.append((family, steps, "ComfyUI FlipSigmas + euler", steps,
                         relative_error(native, latent["samples"])))
            for method, iterations, form in CASES:
                if family == "flow" and form == "paper_autograd":
                    continue  # ComfyUI's Flux uses in-place ops: no gradient through it
                out = invert_node.execute(model, positive, latent, steps, "simple", 1.0, method,
                                          iterations, 0.0, 0.1, "euler", form).args
                _, noise, sigmas, inversion = out
                rec = regenerate(model, positive, noise, latent, sigmas)
                label = (method if method == "ddim" else f"{method} ({form}), {iterations} it"
                         if method in ("gnri", "newton") else f"{method}, {iterations} it")
                rows.append((family, steps, label, inversion.result.nfe,
                             relative_error(rec, latent["samples"])))
    print("| family | steps | method | model calls | relative error |")
    print("|---|---|---|---|---|")
    for family, steps, label, nfe, err in rows:
        print(f"| {family} | {steps} | {label} | {nfe} | {err:.2e} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
