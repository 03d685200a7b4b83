"""Smoke of the editing benchmark (bench/edit_bench.py): a handful of world edit pairs
through the nodes' inversion, Attention Mask Blend and Prompt Swap Edit functions on
the shipped world models, in this process."""
from __future__ import annotations

import math
import os

import pytest

from gnri_testing import comfy_env

pytest.importorskip("gnri_world")

from bench import edit_bench  # noqa: E402


@pytest.fixture(scope="module")
def pack(comfy):
    from bench import env
    return env.setup()


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_edit_bench_smoke(pack, family):
    from gnri_world import scenes
    pairs = scenes.sample_edits(4, seed=2026)
    configs = edit_bench.grid(family, smoke=True)
    rows, mask_rows, pictures = edit_bench.run_family(pack, family, pairs, configs, steps=3,
                                                      limits=edit_bench.tiers(edit_bench.SMOKE), shown=1,
                                                      mask_steps=[(-1, "default")])
    assert len(rows) == len(pairs) * len(configs)
    assert {r["kind"] for r in rows} == set(scenes.EDIT_KINDS)
    for r in rows:
        assert r["psnr_out"] > 0 and 0 <= r["structure_iou"] <= 1
        assert r["calls"] >= 3 + 3 * 2  # inversion (>= 1 call/step) + edit (cond and uncond per step)
        assert math.isnan(r["mask_iou"]) == (r["label"].endswith("no mask"))
    by_label = {t["label"]: t for t in edit_bench.summarise(rows)}
    assert by_label["native"]["inv_calls"] == 1.0
    assert by_label["gnri default"]["inv_calls"] > 1.0
    assert by_label["gnri default"]["calls"] == by_label["gnri default, no mask"]["calls"] + 2  # the mask: source + target
    assert len(mask_rows) == len(pairs) * len(edit_bench.THRESHOLDS)
    assert all(0 <= m["iou"] <= 1 for m in mask_rows)
    assert pictures["source"].shape[0] == len(pictures["_pairs"]) == pictures["native"].shape[0]


def test_box_iou():
    assert edit_bench.box_iou((8, 8, 16), (8, 8, 16)) == pytest.approx(1.0)
    assert edit_bench.box_iou((4, 8, 4), (12, 8, 4)) == 0.0
    assert edit_bench.box_iou((8, 8, 16), (9, 8, 16)) == pytest.approx(12 / 20)
    assert edit_bench.box_iou((math.nan, 8, 0.0), (8, 8, 16)) == 0.0


def test_quick_grid_covers_every_factor():
    """The partial grid varies each required factor around the default."""
    axes = {row[0] for row in edit_bench.grid("unet")}
    assert {"method", "mask", "strength", "start_step", "lam", "threshold", "amb_step", "blocks"} <= axes
    methods = {c.method for axis, _, c, _ in edit_bench.grid("flux") if axis == "method"}
    assert methods == {"native", "ddim", "fixed_point", "anderson", "gnri"}
    assert os.path.isfile(os.path.join(comfy_env.REPO_ROOT, "bench", "edit_bench.py"))
