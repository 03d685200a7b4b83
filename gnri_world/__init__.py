"""A small trained text-to-image world with exact ground truth (see docs/world.md).

    scenes   Scene/Obj, render (image + exact masks), sample_scenes(n, seed), from_caption,
             edit pairs: make_edit / sample_edits -> EditPair(kind, source, target, index)
    scorer   read(image) -> Readings (shape, colour, background, size, position),
             score / accuracy against scenes, psnr (optionally inside a region)
    latent   encode / decode: the exact per-pixel linear "VAE" (families "unet", "flux")
    models   ensure_comfy(), load(family) -> ComfyUI ModelPatcher, text_encoder() -> comfy.sd.CLIP
    generate generate(model, clip, family, captions) and evaluate(...) through comfy.sample
    train    python -m gnri_world.train --family unet|flux [--resume] [--export]

scenes, scorer and latent import only torch; models, generate and train need ComfyUI.
"""
