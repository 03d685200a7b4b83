"""Smoke test of the benchmark (``python -m bench --smoke``: ``--quick`` on its smallest
case) and of ``--gpu`` refusing to run without CUDA. The benchmark itself is not part of
CI; it is run by hand (see README, "How exact, for how many model calls")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gnri_testing import comfy_env

ROOT = comfy_env.REPO_ROOT
# of 40 iso-mixture 4-step flow images, how many the default's solver (without the round-trip
# check) may reconstruct > 1 dB below naive inversion (measured: 2 generated, 0 data samples;
# before step 5's ratio test: 10 and 4); with the check: none
TAILS_FLOW4_BELOW = 5
# of 40 dct-mixture images generated on the 4-step EPS schedule by euler_ancestral (SDXL-Turbo's
# sampler), how many the default's solver (no round-trip check) may reconstruct > 1 dB below naive
# inversion (measured 0; the previous default, without guidance on ancestral steps: 39)
TAILS_ANCESTRAL_EPS4_BELOW = 3
# of 100 iso-mixture 10-step flow images, how many the default's solver (no round-trip check) may
# reconstruct > 1 dB below naive inversion (measured 2; without the mode-flip guard, flip_ratio 0: 5)
TAILS_FLOW10_GUARDED_BELOW = 3


def run_bench(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_smoke(tmp_path):
    out = tmp_path / "results"
    proc = run_bench("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 2 model calls per step, every case" in proc.stdout
    assert "| photo eps 4 gen0 |" in proc.stdout and "| tiny eps 4 gen |" in proc.stdout
    for name in ("results.md", "results.json", "psnr_vs_calls.png", "noise_error_vs_calls.png",
                 "residual_vs_iteration.png"):
        assert (out / name).is_file(), name
    records = json.loads((out / "results.json").read_text())["records"]
    by_method = {(r["model"], r["method"]): r for r in records if r["budget"] <= 2}
    # every method ran on both models; 4 steps x 2 calls for the iterative ones, 4 for the naive ones
    for model in ("photo", "tiny"):
        assert by_method[(model, "ddim")]["nfe"] == 4
        assert by_method[(model, "native")]["nfe"] == 4
        assert by_method[(model, "gnri")]["nfe"] == 8
        assert by_method[(model, "anderson")]["nfe"] == 8
    assert by_method[("tiny", "gnri_autograd")]["backward"] == 8
    # the exact noise is known for generated images; the photo model's default beats naive inversion
    photo_gnri, photo_ddim = by_method[("photo", "gnri")], by_method[("photo", "ddim")]
    assert photo_gnri["noise_err"] is not None and photo_gnri["noise_err"] < photo_ddim["noise_err"]
    assert photo_gnri["psnr"] > photo_ddim["psnr"]
    assert 0 < by_method[("tiny", "gnri")]["mem_ratio"] < 2
    # the default budget (3 calls/step) also ran on the tiny model, for the "never below naive" check
    default = [r for r in records if (r["model"], r["method"], r["budget"]) == ("tiny", "gnri", 3)]
    assert len(default) == 1 and default[0]["nfe"] == 12


def test_regeneration_sensitivity_generated_vs_heldout_photo():
    """``python -m bench sensitivity``'s finding: a 1e-3 error in the converged noise costs
    a generated image ~50 dB smoothly (it stays above 60 dB), while a held-out photo (between
    the mixture's modes) can drop to below 30 dB."""
    from bench import env, photo_bench, sensitivity
    core = env.core()
    sampling = photo_bench.model_samplings()
    worst = {}
    for name in ("gen0", "lfw_face"):
        model, sigmas, x0, noise = sensitivity.converged_case(core, sampling, "eps", 10, name)
        worst[name] = min(sensitivity.perturbed_psnrs(core, model, noise, x0, sigmas, 1e-3))
    assert worst["gen0"] > 60 and worst["lfw_face"] < 30, worst  # measured 70.3 and 26.1


def test_bench_gpu_dry_run_times_every_method(tmp_path):
    """``--gpu`` with tiny stand-in networks on the CPU (GNRI_BENCH_GPU_DRY=1): every method of
    its list exists and runs (autograd is skipped on Flux, whose ops are in-place)."""
    from bench import gpu
    env = dict(os.environ, OMP_NUM_THREADS="1", GNRI_BENCH_GPU_DRY="1")
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_dry.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    expected = 2 * len(gpu.METHODS) - sum(1 for m in gpu.METHODS if m[2].get("gradient") == "autograd")
    assert len(rows) == expected
    default = [r for r in rows if r["method"].startswith("gnri default")]
    # 4 steps x 3 calls, up to 8 where unconverged, + the round-trip check's 1 (3 where it falls through)
    assert len(default) == 2 and all(4 < r["nfe"] <= 4 * (8 + 3) for r in default)
    fixed = [r for r in rows if r["method"].startswith("gnri fixed budget, no check")]
    assert len(fixed) == 2 and all(r["nfe"] == 4 * 3 for r in fixed)
    real_time = [r for r in rows if r["method"].startswith("gnri fixed budget + round-trip check")]
    assert len(real_time) == 2 and all(r["nfe"] in (4 * 4, 4 * 6) for r in real_time)  # + 1 call/step, 3 if it falls through


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: --gpu would run")
def test_bench_gpu_needs_cuda():
    proc = run_bench("--gpu", timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr


def test_tails_measures_generated_images_per_image():
    """``python -m bench tails`` on one small case: per-image PSNR and noise error for every
    generated image, the default's budget, and iterations = 1 equal to naive inversion."""
    import torch
    from bench import env, tails
    from bench.photo_model import PhotoMixture
    core = env.core()
    model = PhotoMixture("eps", size=32, isotropic=0.3)
    sigmas = tails.schedule("eps", 4)
    batches = tails.generate(core, model, sigmas, 4, ancestral=False)
    with torch.no_grad():
        ddim = tails.measure(core, model, sigmas, batches, tails.Config("ddim", "ddim"))
        one = tails.measure(core, model, sigmas, batches, tails.Config("x1", "gnri", {"max_iters": 1}))
        default = tails.measure(core, model, sigmas, batches, tails.Config("default", "gnri"))
    assert len(ddim["psnr"]) == len(default["psnr"]) == 4
    assert one["psnr"] == ddim["psnr"]  # one evaluated candidate: the fixed-point step from z_prev
    gnri = core.DEFAULTS["gnri"]
    assert default["calls_per_step"] <= gnri.max_iters + gnri.extra_iters + 3  # + the round-trip check
    assert all(d > n - 1.0 for d, n in zip(default["psnr"], ddim["psnr"]))


def test_tails_one_image_per_batch_measures_the_cost_rows(monkeypatch):
    """``python -m bench tails --batch 1``: inversions of one image each (what a single photo
    costs), the cost rows only, calls counted per inversion."""
    import torch
    from bench import env, tails
    monkeypatch.setattr(tails, "SCHEDULES", (("eps", 4),))
    mode = dict(images=2, ancestral_images=1, lams=(), runs=(), batch=1)
    with torch.no_grad():
        records = tails.run(env.core(), mode, models=("dct",))
    assert {r["config"] for r in records} == set(tails.COST_ROWS)
    assert {r["inputs"] for r in records} == set(tails.INPUTS)
    for r in records:
        assert len(r["psnr"]) == (1 if r["ancestral"] else 2), r
    by = {(r["inputs"], r["config"]): r for r in records}
    assert by[("generated", "ddim")]["calls_per_step"] == 1.0
    assert by[("generated", "gnri fixed budget (extra_iters 0), no check")]["calls_per_step"] <= 3
    assert "batches of 1" in tails.markdown(records, dict(mode, mode="full", seconds=1.0, command="x", default_lam=0.3))


def test_tails_default_is_never_far_below_naive_where_it_used_to_flip():
    """The tight (iso) mixture's 4-step flow case, where the default used to reconstruct more
    than 1 dB below naive inversion on 21 of 100 generated images: the secant model's last
    unevaluated step is returned only where the model has just predicted well (step 5 of
    ``solve_gnri_secant``); the default's round-trip check takes the rest. Data samples (no
    exact inverse) are measured the same way."""
    import math

    import torch
    from bench import env, tails
    from bench.photo_model import PhotoMixture
    core = env.core()
    model = PhotoMixture("flow", size=32, isotropic=0.3)
    sigmas = tails.schedule("flow", 4)
    with torch.no_grad():
        for batches in (tails.generate(core, model, sigmas, 40, ancestral=False), tails.data_samples(model, 40)):
            ddim = tails.measure(core, model, sigmas, batches, tails.Config("ddim", "ddim"))
            solver = tails.measure(core, model, sigmas, batches, tails.Config("solver", "gnri", tails.NO_CHECK))
            below = sum(d < n - tails.SLACK_DB for d, n in zip(solver["psnr"], ddim["psnr"]))
            assert below <= TAILS_FLOW4_BELOW, (below, solver["psnr"])
            assert sorted(solver["psnr"])[4] > sorted(ddim["psnr"])[4] + 3  # the 10th percentile
            default = tails.measure(core, model, sigmas, batches, tails.Config("default", "gnri"))
            assert all(d >= n - tails.SLACK_DB for d, n in zip(default["psnr"], ddim["psnr"]))  # the check
    assert math.isnan(default["noise_err"][0])  # data samples: no true noise to compare with


def test_tails_real_photos_outside_the_mixture():
    """``heldout_photos``: real photos (faces, scene crops) that are none of the mixture's
    photos, the same for the same seed; on the dct mixture's 4-step EPS case the default
    reconstructs them no worse than naive inversion and better at the median (measured on
    100: 0 below, median 36.1 against 18.2 dB; 25.1 with a fixed 3 iterations)."""
    import torch
    from bench import env, tails
    from bench.photo_model import PhotoMixture, heldout_photos, mixture_means
    photos = heldout_photos(16)
    assert photos.shape == (16, 3, 32, 32) and torch.equal(photos, heldout_photos(16))
    assert not torch.equal(photos, heldout_photos(16, seed=1))
    means = mixture_means(32).float().flatten(1)
    nearest = torch.cdist(photos.flatten(1), means).min(1).values / means.shape[1] ** 0.5
    assert float(nearest.min()) > 0.1  # rms distance to every mixture photo (pixels in [-1, 1])
    core = env.core()
    model = PhotoMixture("eps", size=32)
    sigmas = tails.schedule("eps", 4)
    with torch.no_grad():
        batches = tails.photo_batches(16)
        ddim = tails.measure(core, model, sigmas, batches, tails.Config("ddim", "ddim"))
        default = tails.measure(core, model, sigmas, batches, tails.Config("default", "gnri"))
    below = sum(d < n - tails.SLACK_DB for d, n in zip(default["psnr"], ddim["psnr"]))
    assert below == 0, default["psnr"]
    assert sorted(default["psnr"])[8] > sorted(ddim["psnr"])[8] + 3


def test_tails_ancestral_default_is_guided_toward_naive_inversion():
    """Ancestral inversion (frozen noise maps) on the dct mixture's 4-step EPS case, where the
    unguided secant solver reconstructed 39 of 40 generated images more than 1 dB below naive
    inversion: the guidance pulls ancestral steps toward naive inversion's answer."""
    import torch
    from bench import env, tails
    from bench.photo_model import PhotoMixture
    core = env.core()
    model = PhotoMixture("eps", size=32)
    sigmas = tails.schedule("eps", 4)
    with torch.no_grad():
        batches = tails.generate(core, model, sigmas, 40, ancestral=True)
        ddim = tails.measure(core, model, sigmas, batches, tails.Config("ddim", "ddim"))
        default = tails.measure(core, model, sigmas, batches, tails.Config("default", "gnri", tails.NO_CHECK))
    below = sum(d < n - tails.SLACK_DB for d, n in zip(default["psnr"], ddim["psnr"]))
    assert below <= TAILS_ANCESTRAL_EPS4_BELOW, (below, default["psnr"])
    assert sorted(default["psnr"])[4] > sorted(ddim["psnr"])[4]  # the 10th percentile


def test_tails_mode_flip_guard_keeps_iterates_that_regenerate_the_input():
    """The iso mixture's 10-step flow case, where the lowest-residual iterate of a step at
    sigma 0.7-0.9 can head for another photo (its denoised image twice as far from the
    input): the guard returns the nearer iterate and cuts the images below naive inversion."""
    import torch
    from bench import env, tails
    from bench.photo_model import PhotoMixture
    core = env.core()
    model = PhotoMixture("flow", size=32, isotropic=0.3)
    sigmas = tails.schedule("flow", 10)
    with torch.no_grad():
        batches = tails.generate(core, model, sigmas, 100, ancestral=False)
        psnr = {key: tails.measure(core, model, sigmas, batches, tails.Config(key, "gnri", options))["psnr"]
                for key, options in (("default", tails.NO_CHECK), ("off", {"flip_ratio": 0.0, **tails.NO_CHECK}))}
        ddim = tails.measure(core, model, sigmas, batches, tails.Config("ddim", "ddim"))["psnr"]
    below = {key: sum(p < n - tails.SLACK_DB for p, n in zip(values, ddim)) for key, values in psnr.items()}
    assert below["default"] <= TAILS_FLOW10_GUARDED_BELOW, below
    assert below["default"] < below["off"], below
    assert min(psnr["default"]) > min(psnr["off"])


def test_world_reconstruction_bench_measures_every_row():
    """``python -m bench recon`` on 2 scenes of the world UNet: a PSNR per scene for every
    row; gnri beats naive inversion on the trained model."""
    from bench import env, world_recon
    records = world_recon.run(env.setup(), "unet", 2, steps_list=(4,))
    assert [r["label"] for r in records] == [row[0] for row in world_recon.ROWS]
    assert set(world_recon.HELD_OUT_ROWS) <= {row[0] for row in world_recon.ROWS}  # --held-out's rows exist
    assert all(len(r["psnr"]) == 2 for r in records)
    by = {r["label"]: r for r in records}
    assert all(g > d + 3 for g, d in zip(by["gnri default"]["psnr"], by["ddim"]["psnr"]))
    # 3 per step, up to 8 on unconverged ones (step 7); the round-trip check 1, and 2 more if it falls short
    assert by[world_recon.NO_CHECK_KEY]["calls_per_step"] <= 8
    assert by["gnri default"]["calls_per_step"] <= by[world_recon.NO_CHECK_KEY]["calls_per_step"] + 3
    assert by["gnri fixed budget (extra_iters 0), no check"]["calls_per_step"] <= 3
    # which scenes the check also inverted naively: every ancestral one, none without the check
    assert by["gnri default, euler_ancestral"]["compared"] == [True, True]
    assert by[world_recon.NO_CHECK_KEY]["compared"] == [] and by["ddim"]["compared"] == []
    assert "| gnri default, euler_ancestral | " in world_recon.table(records, "unet", 4)
    assert "| 100 % |" in world_recon.table(records, "unet", 4)


def test_photo_mixture_jacobian_is_the_denoisers_derivative():
    """``PhotoMixture.jacobian`` (diagonal plus rank K + 1 in DCT coefficients, what ``python -m
    bench oracle`` solves with) equals autograd's Jacobian-vector product of the denoiser."""
    import torch
    from bench.photo_model import PhotoMixture, dct2, idct2
    g = torch.Generator().manual_seed(0)
    for family, sigma in (("eps", 0.05), ("eps", 0.45), ("eps", 3.2), ("flow", 0.25), ("flow", 0.75)):
        for isotropic in (None, 0.3):
            model = PhotoMixture(family, size=32, **({} if isotropic is None else {"isotropic": isotropic}))
            x = 0.5 * torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
            v = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
            with torch.enable_grad():
                _, jv = torch.autograd.functional.jvp(lambda y: model(y, torch.tensor([sigma])), x, v)
            gain, u, w = model.jacobian(x, sigma)
            coef = dct2(v, model.m).flatten()
            ours = idct2((gain * coef + u @ (w.T @ coef)).view(v.shape), model.m)
            assert float((ours - jv).norm() / jv.norm()) < 1e-6, (family, sigma, isotropic)


def test_exact_newton_bound_inverts_a_generated_image_and_counts_only_evaluations():
    """``python -m bench oracle``'s damped Newton with the exact Jacobian: at a tolerance it
    reproduces a generated image almost exactly; a budget of K spends exactly K calls per step."""
    import torch
    from bench import env, oracle, tails
    from bench.photo_model import PhotoMixture
    core = env.core()
    model = PhotoMixture("flow", size=32, isotropic=0.3)
    sigmas = tails.schedule("flow", 10)
    batches = tails.generate(core, model, sigmas, 2, ancestral=False, batch=1)
    with torch.no_grad():
        converged = oracle.measure(core, model, sigmas, batches, ("tol", oracle.MAX_CALLS, 1e-3, False))
        two = oracle.measure(core, model, sigmas, batches, ("x2", 2, 0.0, False))
        checked = oracle.measure(core, model, sigmas, batches, ("checked", oracle.MAX_CALLS, 1e-3, True))
    assert min(converged["psnr"]) > 80 and max(converged["noise_err"]) < 1e-3
    assert 1.0 < converged["calls_per_step"] < 4.0
    assert two["calls_per_step"] == 2.0
    # every step converged: the core's check skips the regeneration, so it costs nothing more
    assert checked["calls_per_step"] == converged["calls_per_step"] and checked["psnr"] == converged["psnr"]


def test_oracle_merges_its_per_model_results_into_one_table(tmp_path, monkeypatch):
    """``python -m bench oracle --models iso`` then ``--report-only``: results_<model>.json files
    merge into results.md with every row, per input and per schedule."""
    import argparse
    import torch
    from bench import env, oracle
    monkeypatch.setattr(oracle, "SCHEDULES", (("flow", 4),))
    with torch.no_grad():
        records = oracle.run(env.core(), dict(images=2), models=("iso",))
    meta = dict(mode="full", seconds=1.0, images=2, command="python -m bench oracle")
    (tmp_path / "results_iso.json").write_text(json.dumps({"meta": meta, "records": records}))
    args = argparse.Namespace(report_only=True, out=str(tmp_path), quick=False, models=None)
    assert oracle.main(args, "unused") == 0
    text = (tmp_path / "results.md").read_text()
    for label, *_ in oracle.ROWS:
        assert text.count(f"| {label} |") == 3  # generated, data, and the per-schedule row
    assert "iso mixture, data samples" in text
