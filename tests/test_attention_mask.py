"""Attention Mask Blend: the torch-only math (gnri_core.attention_mask), the node through
ComfyUI's real executor on the tiny models, and masks that follow attention on tiny
models whose attention weights point a token at a known region."""
from __future__ import annotations

import logging

import pytest
import torch
from test_nodes import invert_node, source_nodes

from gnri_core import InversionInputError
from gnri_core import attention_mask as am

SOURCE = "a photo of a cat on a sofa"
TARGET = "a photo of a dog on a sofa"
CAT = 5  # SD1 tokenizer: <start> a photo of a cat ... -> "cat" at position 5


# =========================================================================== core: tokens

@pytest.fixture(scope="module")
def tokenizer(tiny_clip):
    """The real SD1 tokenizer of the tiny CLIP: text -> (token keys, specials)."""
    special = set(am.flatten_tokens(tiny_clip.tokenize("")["l"]))

    def tokens(text):
        return am.flatten_tokens(tiny_clip.tokenize(text)["l"])
    return tokens, special


def test_token_diff_on_real_tokenizer(tokenizer):
    tokens, special = tokenizer
    src, tgt = tokens(SOURCE), tokens(TARGET)
    assert len(src) == len(tgt) == 77 and {49406, 49407} <= special
    assert am.changed_tokens(src, tgt, special) == ([CAT], [CAT])
    # insertion / deletion: only one side has the changed token
    assert am.changed_tokens(tokens("a photo of a cat"), tokens("a photo of a red cat"), special) == ([], [CAT])
    assert am.changed_tokens(tokens("a photo of a red cat"), tokens("a photo of a cat"), special) == ([CAT], [])
    # a word of several tokens: all of them, contiguous
    many = tokens("a photo of a hippopotamus on a sofa")
    _, changed = am.changed_tokens(src, many, special)
    hippo = [k for k in tokens("hippopotamus") if k not in special]
    assert len(changed) == len(hippo) and [many[p] for p in changed] == hippo
    assert changed == list(range(CAT, CAT + len(hippo)))
    # prompt weights do not change the tokens
    assert am.changed_tokens(src, tokens("a photo of a (cat:1.3) on a sofa"), special) == ([], [])


def test_words_and_empty_selection_notes(tokenizer, caplog):
    tokens, special = tokenizer
    src, tgt = tokens(SOURCE), tokens(TARGET)
    sofa = tokens("sofa")
    with caplog.at_level(logging.DEBUG):
        s, t, notes = am.select_tokens(src, tgt, special, [sofa, tokens("zebra")], ["sofa", "zebra"])
        assert s == t == [8] and any("'zebra' not found" in n for n in notes)
        s, t, notes = am.select_tokens(src, tokens(SOURCE), special)
    assert s == t == [] and "identical prompts, no changed tokens" in notes[0]
    assert not caplog.text                     # the core returns notes; the node logs them
    assert am.parse_words(" cat, red  sofa ,,") == ["cat", "red  sofa"]


def test_selected_tokens_as_words(tiny_clip, tokenizer):
    """The node's text names the words, not token positions; a long selection stays short."""
    tokens, special = tokenizer
    pieces = tiny_clip.tokenizer.clip_l.inv_vocab

    def describe(text, positions, **kw):
        return am.describe_tokens([pieces[k] for k in tokens(text)], positions, **kw)
    many = tokens("a photo of a hippopotamus on a sofa")
    _, changed = am.changed_tokens(tokens(SOURCE), many, special)
    assert describe(SOURCE, [CAT]) == "'cat'" and describe(SOURCE, []) == "none"
    assert describe("a photo of a hippopotamus on a sofa", changed) == "'hippopotamus'"
    assert describe(SOURCE, [CAT, CAT + 1, CAT + 3]) == "'cat on', 'sofa'"
    long = ("an oil painting of three large brown horses running across a wide green meadow under a "
            "cloudy evening sky near old stone houses, " * 3)
    run = describe(long, range(1, 70))                  # one run of 69 tokens: cut, not listed
    assert run.startswith("'an oil painting of three") and run.endswith("\u2026'") and len(run) <= 42
    assert describe(SOURCE, [1, 3, 5, 7], limit=2) == "'a', 'of' and 2 more"
    src, tgt = am.changed_tokens(tokens(SOURCE), tokens(long), special)
    assert len(tgt) > 50 and len(describe(long, tgt)) < 6 * 42 + 20


def test_conditioning_weights_name_positions_beyond():
    weights, notes = am.conditioning_weights([1, 3, 99], 4, "source")
    assert weights.tolist() == [0, 1, 0, 1] and "source: 1 selected token(s) lie beyond" in notes[0]
    weights, notes = am.conditioning_weights([2], 4, "target")
    assert weights.tolist() == [0, 0, 1, 0] and notes == []
    assert am.conditioning_weights([7, 8], 4, "target")[0] is None


def test_weights_fit_repeated_conditioning():
    w = am.position_weights([1, 3, 99], 4)
    assert w.tolist() == [0, 1, 0, 1]
    assert am.fit_weights(w, 8).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]  # ComfyUI repeats short conds
    assert am.fit_weights(w, 2).tolist() == [0, 1] and am.fit_weights(w, 5).tolist() == [0, 1, 0, 1, 0]


# =========================================================================== core: probabilities

def reference_probs(q, k, w, queries, tokens, mask=None):
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    p = logits.softmax(-1)[:, :, queries[0]:queries[1], tokens[0]:tokens[1]]
    return (p * w[:, None, None, :]).sum(dim=(1, 3))


def test_attention_to_tokens_matches_softmax_in_chunks():
    gen = torch.Generator().manual_seed(0)
    b, h, lq, d = 2, 3, 40, 8
    q, k = torch.randn(b, h, lq, d, generator=gen), torch.randn(b, h, lq, d, generator=gen)
    # joint attention: 10 text tokens first, then 30 image tokens; softmax over all 40 keys
    w = torch.zeros(b, 10)
    w[0, 2] = w[1, 5] = w[1, 6] = 1
    ref = reference_probs(q, k, w, (10, 40), (0, 10))
    for budget in (1, 7 * h * b * lq, 1 << 20):   # 1 query per chunk, 7, all at once
        got = am.attention_to_tokens(q, k, w, queries=(10, 40), tokens=(0, 10), max_elements=budget)
        assert got.shape == (b, 30) and torch.allclose(got, ref, atol=1e-6)
    # masks: additive and boolean, applied before the softmax
    additive = torch.randn(lq, lq, generator=gen)
    assert torch.allclose(am.attention_to_tokens(q, k, w, (10, 40), (0, 10), mask=additive, max_elements=500),
                          reference_probs(q, k, w, (10, 40), (0, 10), additive), atol=1e-6)
    keep = torch.rand(lq, lq, generator=gen) > 0.3
    keep[:, 0] = True
    assert torch.allclose(am.attention_to_tokens(q, k, w, (10, 40), (0, 10), mask=keep, max_elements=500),
                          reference_probs(q, k, w, (10, 40), (0, 10), keep), atol=1e-6)
    # cross attention: all keys are tokens; (B, L, H*D) layout through split_heads
    kt = torch.randn(b, 77, h * d, generator=gen)
    qx = torch.randn(b, 64, h * d, generator=gen)
    w77 = am.position_weights([5], 77)
    got = am.attention_to_tokens(am.split_heads(qx, h), am.split_heads(kt, h), w77)
    ref = reference_probs(am.split_heads(qx, h), am.split_heads(kt, h), w77.expand(b, -1), (0, 64), (0, 77))
    assert torch.allclose(got, ref, atol=1e-6)
    assert not am.attention_to_tokens(q, k, torch.zeros(b, 10), (10, 40), (0, 10)).any()


# =========================================================================== core: maps to masks

def test_grids_and_resolution_choice():
    assert am.token_grid(64, 16, 16) == (8, 8) and am.token_grid(256, 16, 16) == (16, 16)
    assert am.token_grid(12, 7, 5) == (4, 3) == am.patch_grid(7, 5, 2)   # padded DiT patches / UNet levels
    with pytest.raises(ValueError):
        am.token_grid(10, 16, 16)
    assert am.pick_resolution([(64, 64), (32, 32), (16, 16), (8, 8)]) == (16, 16)   # SD1.5 at 512
    assert am.pick_resolution([(64, 64), (32, 32)]) == (32, 32)                     # SDXL at 1024
    assert am.pick_resolution([(16, 16), (8, 8)]) == (16, 16)
    m = torch.arange(4.0).view(1, 2, 2)
    assert am.crop_grid(m, 2, (3, 4)).tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]]]


def test_step_and_block_choice():
    assert [am.choose_step(n, -1) for n in (0, 1, 4, 5)] == [0, 1, 2, 3]   # middle, towards noise
    assert am.choose_step(4, 0) == 0 and am.choose_step(4, 4) == 4
    with pytest.raises(InversionInputError, match=r"step: must be -1 \(middle\) or lie in \[0, 4\]"):
        am.choose_step(4, 5)
    assert am.pick_blocks(3) == [0, 1, 2] and am.pick_blocks(19) == [9, 12, 15, 18]   # Flux: 19 double blocks


def test_attention_maps_average_layers_per_prompt():
    """Two prompts in one call's batch (chunks), layers at two grids: the grid closest to
    16x16 is averaged per prompt; a chunk batched differently adds its mean to every latent."""
    maps = am.AttentionMaps({0: am.position_weights([1], 3), 1: am.position_weights([2], 3)}, batch=2)
    rows = maps.row_weights([0, 1], 4, 3, "cpu")
    assert rows.tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert maps.row_weights([5], 2, 3, "cpu") is None                     # no selected tokens
    for value in (1.0, 3.0):                                                # two layers at 16x16
        maps.add(torch.full((4, 256), value), [0, 1], (16, 16))
    maps.add(torch.ones(4, 64), [0, 1], (8, 8))
    maps.add(torch.full((2, 256), 2.0), [1], (16, 16))                     # a one-chunk call
    prompt_maps, grid = maps.prompt_maps()
    assert grid == (16, 16) and [m.shape for m in prompt_maps] == [(2, 16, 16)] * 2
    assert prompt_maps[0].unique().tolist() == [2.0] and prompt_maps[1].unique().tolist() == [2.0]
    maps.add(torch.ones(1, 256), [0], (16, 16))                            # batch 1 of a latent batch 2
    assert maps.prompt_maps()[0][0].unique().tolist() == [pytest.approx(5 / 3)]
    assert am.AttentionMaps({}, 1).prompt_maps() == ([], None)


def test_normalise_threshold_dilate_blur():
    raw = am.normalise_by_max(torch.tensor([[[0.0, 1.0, 2.0, 4.0]]]).expand(2, 4, 4).clone())
    assert raw.max() == 1 and torch.equal(am.normalise_by_max(torch.zeros(1, 3, 3)), torch.zeros(1, 3, 3))
    mask = am.threshold_mask(raw, 0.5)
    assert mask[0, 0].tolist() == [0, 0, 1, 1]
    assert not am.threshold_mask(torch.zeros(1, 2, 2), 0.0).any()       # empty map: empty mask
    dot = torch.zeros(1, 9, 9)
    dot[0, 4, 4] = 1
    grown = am.dilate_mask(dot, 2)
    assert grown.sum() == 25 and grown[0, 2:7, 2:7].all()
    soft = am.blur_mask(grown, 1.0)
    assert 0 < soft[0, 1, 4] < soft[0, 4, 4] <= 1 and abs(float(soft.sum()) - 25) < 1.0
    assert torch.equal(am.blur_mask(grown, 0), grown) and torch.equal(am.dilate_mask(dot, 0), dot)


def test_user_mask_resize_batch_and_combine():
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1
    fitted = am.fit_user_mask(left, 3, (16, 16))
    assert fitted.shape == (3, 16, 16) and fitted[..., :7].min() == 1 and fitted[..., 9:].max() == 0
    assert am.fit_user_mask(left[0], 1, (16, 16)).shape == (1, 16, 16)            # (H, W) accepted
    with pytest.raises(InversionInputError, match="mask: batch of 2 masks for a latent batch of 3"):
        am.fit_user_mask(left.expand(2, -1, -1), 3, (16, 16))
    a, b = torch.tensor([[[0.0, 1.0, 0.5]]]), torch.tensor([[[1.0, 0.0, 0.25]]])
    assert am.combine_masks(a, b, "replace").tolist() == b.tolist()
    assert am.combine_masks(a, b, "union").tolist() == [[[1.0, 1.0, 0.5]]]
    assert am.combine_masks(a, b, "intersect").tolist() == [[[0.0, 0.0, 0.25]]]
    assert am.combine_masks(a, None, "union") is a
    with pytest.raises(InversionInputError, match="mask_mode"):
        am.combine_masks(a, b, "xor")
    with pytest.raises(InversionInputError, match="mask_mode: unknown 'xor'"):
        am.check_mask_options(1, (16, 16), mode="xor")
    with pytest.raises(InversionInputError, match="blur and dilate"):
        am.check_mask_options(1, (16, 16), blur=-1)
    assert am.check_mask_options(3, (16, 16), user_mask=left).shape == (3, 16, 16)


def test_mask_from_maps_and_image_round_trip():
    attention = torch.zeros(1, 8, 8)
    attention[0, :, :4] = 3.0                      # left half of an 8x8 grid
    mask, raw = am.mask_from_maps([attention], 2, (16, 16), threshold=0.6)
    assert mask.shape == raw.shape == (2, 16, 16) and raw.max() == 1
    assert mask[:, :, :7].min() == 1 and mask[:, :, 9:].max() == 0
    # empty selection: no maps -> empty mask and map; a user mask still combines
    empty, raw0 = am.mask_from_maps([], 1, (16, 16))
    assert not empty.any() and not raw0.any()
    user = torch.ones(1, 32, 32)
    assert am.mask_from_maps([], 1, (16, 16), user_mask=user, mode="union")[0].min() == 1
    # image resolution (nearest x8) resized back bilinearly, as Prompt Swap Edit does: exact
    soft, _ = am.mask_from_maps([attention], 1, (16, 16), blur=1.0, dilate=1)
    image = am.upscale_mask(soft, 8)
    assert image.shape == (1, 128, 128)
    assert torch.allclose(am.resize_maps(image, (16, 16)), soft, atol=1e-6)
    with pytest.raises(InversionInputError, match="threshold"):
        am.mask_from_maps([attention], 1, (16, 16), threshold=1.5)


# =========================================================================== the node in the executor

def blend_node(**extra) -> dict:
    inputs = {"model": ["model", 0], "clip": ["model", 1], "inversion": ["invert", 3],
              "source_prompt": SOURCE, "target_prompt": TARGET, "threshold": 0.6, "blur": 1.0,
              "dilate": 1, "step": -1}
    inputs.update(extra)
    return {"class_type": "GNRIAttentionMaskBlend", "inputs": inputs}


def blend_prompt(family: str, batch: int = 1, **extra) -> dict:
    """Tiny model -> GNRI Invert (4 ddim steps) -> Attention Mask Blend -> MaskPreview.
    Flux: random conditioning 77 long (positions from the SD1 tokenizer), given to the node."""
    prompt = {**source_nodes(family, batch=batch), "invert": invert_node("ddim", 1, steps=4),
              "blend": blend_node(**extra), "preview": {"class_type": "MaskPreview", "inputs": {"mask": ["blend", 0]}}}
    if family == "flow":
        prompt["positive"]["inputs"]["length"] = 77
        prompt["target"] = {"class_type": "GNRITestConditioning",
                            "inputs": {"family": "flow", "batch": 1, "seed": 5, "length": 77}}
        prompt["blend"]["inputs"].update(source=["positive", 0], target=["target", 0])
    return prompt


def left_half_mask(size: int = 64, name: str = "user") -> dict:
    return {f"{name}_zero": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}},
            f"{name}_one": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size // 2, "height": size}},
            name: {"class_type": "MaskComposite",
                   "inputs": {"destination": [f"{name}_zero", 0], "source": [f"{name}_one", 0],
                              "x": 0, "y": 0, "operation": "add"}}}


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_node_outputs_masks_at_image_resolution(executor, family):
    ui = executor.run(blend_prompt(family))
    mask, attention = executor.node_output("blend")
    assert mask.shape == attention.shape == (1, 128, 128)
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1 and float(attention.max()) == 1.0
    assert 0 < float(mask.mean()) < 1
    text = ui["blend"]["text"][0]
    grid = "8x8" if family == "flow" else "16x16"
    assert text.startswith(f"step 2 (sigma ") and f"attention read at {grid}" in text, text
    assert "source words: 'cat'" in text and "target words: 'dog'" in text, text
    assert ui["blend"]["images"] and ui["preview"]["images"]       # previews of the mask
    # the user's model is not patched in place
    model, _ = executor.node_output("model")
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_node_batch_and_user_mask(executor):
    # a user mask of another size (64x64) replaces the attention mask, resized to the latent
    prompt = {**blend_prompt("eps", batch=2, mask=["user", 0], mask_mode="replace"), **left_half_mask()}
    executor.run(prompt)
    mask, attention = executor.node_output("blend")
    assert mask.shape == (2, 128, 128) and attention.shape == (2, 128, 128)
    assert mask[..., :56].min() == 1 and mask[..., 72:].max() == 0
    for mode, op in (("union", torch.maximum), ("intersect", torch.minimum)):
        prompt["blend"]["inputs"]["mask_mode"] = mode
        executor.run(prompt)
        combined, _ = executor.node_output("blend")
        prompt_own = {**blend_prompt("eps", batch=2)}
        executor.run(prompt_own)
        own, _ = executor.node_output("blend")
        assert torch.allclose(combined, op(own, mask), atol=1e-5), mode


def test_node_bad_inputs(executor, caplog):
    from conftest import PromptExecutionError

    # identical prompts: an empty mask and a warning, not a crash
    with caplog.at_level(logging.WARNING):
        ui = executor.run(blend_prompt("eps", target_prompt=SOURCE))
    mask, attention = executor.node_output("blend")
    assert not mask.any() and not attention.any()
    text = ui["blend"]["text"][0]
    assert "warning: target_prompt: tokenises the same as source_prompt (identical prompts" in text
    assert "no attention read" in text and "source words: none" in text and "None" not in text
    assert "Attention Mask Blend: target_prompt" in caplog.text
    # named words instead of the diff
    executor.run(blend_prompt("eps", target_prompt=SOURCE, words="sofa"))
    assert executor.node_output("blend")[1].max() == 1
    # a batch of 2 masks for a latent batch of 3
    prompt = {**blend_prompt("eps", batch=3, mask=["masks", 0]), **left_half_mask(),
              "image": {"class_type": "MaskToImage", "inputs": {"mask": ["user", 0]}},
              "images": {"class_type": "RepeatImageBatch", "inputs": {"image": ["image", 0], "amount": 2}},
              "masks": {"class_type": "ImageToMask", "inputs": {"image": ["images", 0], "channel": "red"}}}
    with pytest.raises(PromptExecutionError, match="mask: batch of 2 masks for a latent batch of 3"):
        executor.run(prompt)
    # an INVERSION of a flow model given with an eps model
    prompt = blend_prompt("flow")
    prompt["eps_model"] = {"class_type": "GNRITestTinyModel", "inputs": {"family": "eps", "dtype": "fp32", "seed": 0}}
    prompt["blend"]["inputs"]["model"] = ["eps_model", 0]
    with pytest.raises(PromptExecutionError, match="inversion: made with a flow model, but this model is eps"):
        executor.run(prompt)
    # Flux without conditioning: the (SD1) CLIP's encoding does not fit the model
    prompt = blend_prompt("flow")
    del prompt["blend"]["inputs"]["source"], prompt["blend"]["inputs"]["target"]
    with pytest.raises(PromptExecutionError, match="source/target: the conditioning does not fit this model"):
        executor.run(prompt)
    # a step beyond the trajectory
    with pytest.raises(PromptExecutionError, match=r"step: must be -1 \(middle\) or lie in \[0, 4\]"):
        executor.run(blend_prompt("eps", step=7))


# =========================================================================== masks follow attention

@pytest.fixture(scope="module")
def pack():
    from gnri_testing.pack_loader import pack_module
    return pack_module("nodes.attention_nodes"), pack_module("nodes.comfy_glue"), pack_module("gnri_core")


def handmade_inversion(pack, model, latent: torch.Tensor, family: str, steps: int = 4):
    """An INVERSION whose trajectory latents (model space) are all ``latent``."""
    import comfy.samplers

    _, glue, core = pack
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps).float().cpu().flip(0)
    result = core.InversionResult(noise=latent, trajectory=[latent.clone() for _ in range(steps + 1)],
                                  sigmas=sigmas, method="ddim", family=family)
    return glue.Inversion(result=result, family=family, latent_shape=tuple(latent.shape),
                          model_name=type(model.model).__name__,
                          latent_format=model.get_model_object("latent_format"))


def region_latent(channels: int, region: str, size: int = 16) -> torch.Tensor:
    """Channel 0 = +1 inside the region (left or top half), -1 outside; others 0."""
    z = torch.zeros(1, channels, size, size)
    inside = torch.zeros(size, size, dtype=torch.bool)
    if region == "left":
        inside[:, : size // 2] = True
    else:
        inside[: size // 2] = True
    z[0, 0] = torch.where(inside, 1.0, -1.0)
    return z, inside


def token_conditioning(width: int, position: int = CAT, value: float = 1.0, pooled: bool = True):
    """Conditioning that is zero except feature 0 of the token at ``position``."""
    cond = torch.zeros(1, 77, width)
    cond[0, position, 0] = value
    return [[cond, {"pooled_output": torch.zeros(1, width)} if pooled else {}]]


@torch.no_grad()
def steer_unet(model):
    """The tiny UNet's first cross-attention (input block 1, the 16x16 level) reads
    latent channel 0 in its queries and context feature 0 in its keys: conv_in copies
    channel 0, the ResBlock and self-attention add nothing, proj_in is the identity.
    Other attention layers keep their random weights."""
    dm = model.model.diffusion_model
    conv_in = dm.input_blocks[0][0]
    conv_in.weight.zero_()
    conv_in.bias.zero_()
    conv_in.weight[0, 0, 1, 1] = 1.0
    res, st = dm.input_blocks[1][0], dm.input_blocks[1][1]
    res.out_layers[-1].weight.zero_()
    res.out_layers[-1].bias.zero_()
    st.proj_in.weight.copy_(torch.eye(st.proj_in.weight.shape[0]).view_as(st.proj_in.weight))
    st.proj_in.bias.zero_()
    block = st.transformer_blocks[0]
    block.attn1.to_out[0].weight.zero_()
    block.attn1.to_out[0].bias.zero_()
    block.attn2.to_q.weight.zero_()
    block.attn2.to_q.weight[:, 0] = 1.0
    block.attn2.to_k.weight.zero_()
    block.attn2.to_k.weight[:, 0] = 1.0
    return model


@torch.no_grad()
def steer_flux(model):
    """The tiny Flux's double block: image queries (head dims 0-7, the RoPE axis that
    does not rotate) read latent channel 0; text keys read context feature 0; image keys
    are zero; modulations are off."""
    dm = model.model.diffusion_model
    dm.img_in.weight.zero_()
    dm.img_in.bias.zero_()
    dm.img_in.weight[0, 0:4] = 0.25            # patch features (c, ph, pw): channel 0's 2x2 patch
    dm.txt_in.weight.zero_()
    dm.txt_in.bias.zero_()
    dm.txt_in.weight[0, 0] = 1.0
    block = dm.double_blocks[0]
    hidden, heads = block.hidden_size, block.num_heads
    dim = hidden // heads
    for mod in (block.img_mod.lin, block.txt_mod.lin):
        mod.weight.zero_()
        mod.bias.zero_()
    img_qkv, txt_qkv = block.img_attn.qkv, block.txt_attn.qkv
    img_qkv.weight[: 2 * hidden].zero_()
    img_qkv.bias[: 2 * hidden].zero_()
    txt_qkv.weight[hidden: 2 * hidden].zero_()
    txt_qkv.bias[hidden: 2 * hidden].zero_()
    for h in range(heads):
        img_qkv.weight[h * dim: h * dim + 8, 0] = 1.0                     # q
        txt_qkv.weight[hidden + h * dim: hidden + h * dim + 8, 0] = 1.0   # k
    block.txt_attn.norm.key_norm.scale[:8] = 3.0
    return model


@pytest.fixture(scope="module")
def steered():
    from gnri_testing import tiny_models
    return {"eps": steer_unet(tiny_models.tiny_eps_model(seed=1)),
            "flow": steer_flux(tiny_models.tiny_flux_model(seed=1))}


@pytest.mark.parametrize("family", ["eps", "flow"])
@pytest.mark.parametrize("region", ["left", "top"])
def test_mask_follows_attention(pack, steered, tiny_clip, family, region):
    nodes, _, _ = pack
    model = steered[family]
    options_before = repr(model.model_options)
    latent, inside = region_latent(16 if family == "flow" else 4, region)
    inversion = handmade_inversion(pack, model, latent, family)
    width = 32 if family == "flow" else 768
    cond = token_conditioning(width)
    out = nodes.attention_mask_blend(model, tiny_clip, inversion, SOURCE, TARGET, threshold=0.6, blur=0.0,
                                     dilate=0, source=cond, target=cond)
    assert out["tokens"] == {"source": [CAT], "target": [CAT]}
    assert out["grid"] == ((8, 8) if family == "flow" else (16, 16))
    inside_px = inside.repeat_interleave(8, 0).repeat_interleave(8, 1)
    mask, raw = out["mask"][0], out["attention"][0]
    assert mask[inside_px].min() == 1 and mask[~inside_px].max() == 0, region
    assert raw[inside_px].min() > 0.9 and raw[~inside_px].max() < 0.1
    assert repr(model.model_options) == options_before          # patches went on a clone
    # the map follows the token, not the region: "sofa" (a zero key) gets the attention
    # that "cat" leaves, i.e. more outside the region than inside
    other = nodes.attention_mask_blend(model, tiny_clip, inversion, SOURCE, TARGET, words="sofa",
                                       threshold=0.6, blur=0.0, dilate=0, source=cond, target=cond)
    assert other["tokens"] == {"source": [8], "target": [8]}
    sofa = other["attention"][0]
    assert float(sofa[inside_px].mean()) < float(sofa[~inside_px].mean())


def test_inversion_of_other_latent_size_rejected(pack, steered, tiny_clip):
    nodes, _, core = pack        # the pack's own error class (imported as ComfyUI would)
    model = steered["eps"]
    latent, _ = region_latent(16, "left")            # 16 channels: a Flux-sized latent, labelled eps
    inversion = handmade_inversion(pack, model, latent, "eps")
    with pytest.raises(core.InversionInputError, match="inversion: latents have 16 channels, this model expects 4"):
        nodes.attention_mask_blend(model, tiny_clip, inversion, SOURCE, TARGET)
    with pytest.raises(core.InversionInputError, match="INVERSION"):
        nodes.attention_mask_blend(model, tiny_clip, object(), SOURCE, TARGET)


def test_existing_patches_are_chained(pack, steered, tiny_clip):
    """An attn2 replace patch already on the model still runs (on the clone), and the
    mask is the same."""
    nodes, _, _ = pack
    model = steered["eps"].clone()
    calls = []

    def counting(q, k, v, extra_options):
        calls.append(extra_options["block"])
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])
    model.set_model_attn2_replace(counting, "input", 1)
    latent, inside = region_latent(4, "left")
    inversion = handmade_inversion(pack, model, latent, "eps")
    cond = token_conditioning(768)
    out = nodes.attention_mask_blend(model, tiny_clip, inversion, SOURCE, TARGET, blur=0.0, dilate=0,
                                     source=cond, target=cond)
    assert calls and all(b == ("input", 1) for b in calls)
    inside_px = inside.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert out["mask"][0][inside_px].min() == 1 and out["mask"][0][~inside_px].max() == 0


def test_mask_resolution_follows_the_latent_format(pack, tiny_clip):
    """Image pixels per latent cell come from the model's latent format where it says
    (newer ComfyUI: ``spacial_downscale_ratio``), else 8."""
    from gnri_testing import tiny_models

    nodes, _, _ = pack
    model = steer_unet(tiny_models.tiny_eps_model(seed=1))
    latent, inside = region_latent(4, "left")
    inversion = handmade_inversion(pack, model, latent, "eps")
    cond = token_conditioning(768)
    model.model.latent_format.spacial_downscale_ratio = 1          # e.g. a latent with no downsampling
    out = nodes.attention_mask_blend(model, tiny_clip, inversion, SOURCE, TARGET, blur=0.0, dilate=0,
                                     source=cond, target=cond)
    assert out["mask"].shape == out["attention"].shape == (1, 16, 16)
    assert out["mask"][0][inside].min() == 1 and out["mask"][0][~inside].max() == 0
