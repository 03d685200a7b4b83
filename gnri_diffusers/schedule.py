"""A diffusers scheduler's sampling levels in the core's sigma space.

DDIM (``DDIMScheduler``/``DDIMInverseScheduler``): sigma = sqrt((1 - abar)/abar); the
scheduler's sample is sqrt(abar)*x ("scaled" space), converted on the way in and out.
The clean level is the scheduler's final alpha (``set_alpha_to_one=False``: sigma > 0).
Euler (``EulerDiscreteScheduler``): the scheduler's sample is already x.
Flow (``FlowMatchEulerDiscreteScheduler``): the sample is x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gnri_core import InversionInputError

@dataclass(frozen=True)
class Schedule:
    """A diffusers scheduler's sampling levels in the core's sigma space.

    kind:        "ddim", "euler" or "flow".
    prediction:  "epsilon", "v_prediction", "sample" (DDIM/Euler) or "flow" (velocity).
    sigmas:      ascending float64 sigmas, ``sigmas[0]`` the clean level the scheduler
                 ends at, ``sigmas[-1]`` the level it starts from.
    timesteps:   the model timestep at every level (``nan`` where diffusers never calls
                 the model: the clean level).
    init_noise_sigma: the scheduler's ``init_noise_sigma`` (pipelines multiply the
                 ``latents`` argument by it).
    num_train_timesteps, train_sigmas: for timesteps of sigmas outside the schedule.
    """

    kind: str
    prediction: str
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float = 1.0
    num_train_timesteps: int = 1000
    train_sigmas: Optional[torch.Tensor] = None
    continuous_timesteps: bool = False  # Euler timestep_type="continuous": t = 0.25 log(sigma)

    @property
    def family(self) -> str:
        """The core's model family: "flow" or "eps" (EPS and V-prediction)."""
        return "flow" if self.kind == "flow" else "eps"

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def core_sigmas(self) -> torch.Tensor:
        """Ascending float32 sigmas for ``gnri_core.invert`` (flip for ``reconstruct``)."""
        return self.sigmas.float()

    def sample_scale(self, level: int) -> float:
        """Scheduler sample = scale * core latent at ``level`` (DDIM: sqrt(abar))."""
        if self.kind != "ddim":
            return 1.0
        return 1.0 / math.sqrt(1.0 + float(self.sigmas[level]) ** 2)

    def to_core(self, sample: torch.Tensor, level: int = 0) -> torch.Tensor:
        """A scheduler sample at ``level`` -> the core's latent (float32)."""
        return sample.float() / self.sample_scale(level)

    def from_core(self, z: torch.Tensor, level: int = -1) -> torch.Tensor:
        """The core's latent at ``level`` -> the scheduler's sample (float32)."""
        return z.float() * self.sample_scale(level % len(self.sigmas))

    def level_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the schedule level of every sigma (B,), -1 where none matches."""
        sigma = sigma.detach().double().cpu().flatten()
        table = self.sigmas
        diff = (sigma[:, None] - table[None, :]).abs()
        idx = diff.argmin(dim=1)
        tol = 1e-5 * table[idx].abs().clamp_min(1e-3)
        return torch.where(diff.gather(1, idx[:, None]).squeeze(1) <= tol, idx, torch.full_like(idx, -1))

    def timestep_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model timestep for every sigma (B,), float32: the scheduler's own timestep
        on its levels, else interpolated in log-sigma (flow: sigma * num_train_timesteps)."""
        sigma = sigma.detach().double().cpu().flatten()
        idx = self.level_of(sigma)
        out = torch.empty_like(sigma)
        for b in range(len(sigma)):
            t = float(self.timesteps[idx[b]]) if idx[b] >= 0 else float("nan")
            if math.isnan(t):
                t = self._interpolate_timestep(float(sigma[b]))
            out[b] = t
        return out.float()

    def _interpolate_timestep(self, sigma: float) -> float:
        if self.kind == "flow":
            return sigma * self.num_train_timesteps
        if self.continuous_timesteps:
            return 0.25 * math.log(max(sigma, 1e-10))
        if self.train_sigmas is None:
            raise InversionInputError(f"sigma {sigma:.6g} is not on the schedule and the scheduler "
                                      "has no training sigmas to interpolate a timestep from")
        log_sigmas = self.train_sigmas.log()
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(torch.clamp((log_sigmas <= log_sigma).sum() - 1, 0, len(log_sigmas) - 2))
        lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
        w = min(max((log_sigma - lo) / (hi - lo), 0.0), 1.0)
        return low + w


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("gnri_diffusers needs diffusers: "
                          "pip install 'comfyui-gnri[diffusers]' (or pip install diffusers)") from exc
    return diffusers


def _fresh(scheduler):
    """A scheduler of the same class and config, so set_timesteps leaves the caller's alone."""
    return type(scheduler).from_config(scheduler.config)


def _check_prediction(config, allowed=("epsilon", "v_prediction", "sample")) -> str:
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in allowed:
        raise InversionInputError(f"scheduler: prediction_type {prediction!r} is not supported; "
                                  f"expected one of {allowed}")
    return prediction


def make_schedule(scheduler, num_inference_steps: int, *, sigmas: Optional[Sequence[float]] = None,
                  mu: Optional[float] = None, image_seq_len: Optional[int] = None,
                  timesteps: Optional[Sequence[float]] = None) -> Schedule:
    """The :class:`Schedule` a pipeline samples with ``scheduler`` and ``num_inference_steps``.

    Supported: ``DDIMScheduler``/``DDIMInverseScheduler`` (spacing "leading"/"trailing",
    or any spacing whose steps chain), ``EulerDiscreteScheduler`` and
    ``FlowMatchEulerDiscreteScheduler``. ``sigmas``/``mu``/``timesteps`` go to
    ``set_timesteps`` (flow; ``mu`` is computed from ``image_seq_len`` as the Flux/SD3
    pipelines do when the config uses dynamic shifting). The caller's scheduler is not
    modified.
    """
    _require_diffusers()
    name = type(scheduler).__name__
    steps = int(num_inference_steps)
    if steps < 1:
        raise InversionInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if name in ("DDIMScheduler", "DDIMInverseScheduler"):
        return _ddim_schedule(scheduler, steps)
    if name == "EulerDiscreteScheduler":
        return _euler_schedule(scheduler, steps, sigmas=sigmas, timesteps=timesteps)
    if name == "FlowMatchEulerDiscreteScheduler":
        return _flow_schedule(scheduler, steps, sigmas=sigmas, mu=mu, image_seq_len=image_seq_len,
                              timesteps=timesteps)
    raise InversionInputError(
        f"scheduler: {name} is not supported; use DDIMScheduler (or DDIMInverseScheduler), "
        "EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler (e.g. "
        "DDIMScheduler.from_config(pipe.scheduler.config))")


def _ddim_schedule(scheduler, steps: int) -> Schedule:
    from diffusers import DDIMScheduler

    config = scheduler.config
    for flag in ("clip_sample", "thresholding"):
        if config.get(flag, False):
            raise InversionInputError(
                f"scheduler: {flag}=True clips the x0-prediction, which makes the DDIM step "
                f"non-invertible; build the scheduler with {flag}=False (as SD pipelines do)")
    prediction = _check_prediction(config)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    descending = [int(t) for t in sched.timesteps]
    ratio = sched.config.num_train_timesteps // steps
    for t, t_next in zip(descending[:-1], descending[1:], strict=True):
        if t - ratio != t_next:  # DDIMScheduler steps from t to t - ratio, then evaluates t_next
            raise InversionInputError(
                f"scheduler: with timestep_spacing={config.get('timestep_spacing')!r} and {steps} steps "
                f"the DDIM steps do not chain (t={t} steps to {t - ratio} but the next step "
                f"evaluates {t_next}); use 'leading' or 'trailing' with a step count dividing "
                f"{sched.config.num_train_timesteps}")
    abar = sched.alphas_cumprod.double()
    last = descending[-1] - ratio
    clean = float(abar[last]) if last >= 0 else float(sched.final_alpha_cumprod)
    levels = [clean] + [float(abar[t]) for t in reversed(descending)]
    alphas = torch.tensor(levels, dtype=torch.float64)
    sigmas = ((1 - alphas) / alphas).sqrt()
    if not torch.isfinite(sigmas).all():
        raise InversionInputError("scheduler: a level has alpha_cumprod = 0 (zero terminal SNR): "
                                  "infinite sigma, which the DDIM step cannot invert")
    timesteps = torch.tensor([float(last) if last >= 0 else float("nan")]
                             + [float(t) for t in reversed(descending)], dtype=torch.float64)
    train_sigmas = ((1 - abar) / abar).sqrt()
    return Schedule("ddim", prediction, sigmas, timesteps, float(sched.init_noise_sigma),
                    int(sched.config.num_train_timesteps), train_sigmas)


def _euler_schedule(scheduler, steps: int, sigmas=None, timesteps=None) -> Schedule:
    prediction = _check_prediction(scheduler.config)
    sched = _fresh(scheduler)
    kwargs = {}
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
    elif timesteps is not None:
        kwargs["timesteps"] = list(timesteps)
    else:
        kwargs["num_inference_steps"] = steps
    sched.set_timesteps(**kwargs)
    down = sched.sigmas.double().cpu()
    ts = sched.timesteps.double().cpu()
    ascending = down.flip(0)
    levels_t = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), ts.flip(0)])
    abar = sched.alphas_cumprod.double()
    train_sigmas = ((1 - abar) / abar).sqrt()
    continuous = sched.config.get("timestep_type", "discrete") == "continuous"
    return Schedule("euler", prediction, ascending, levels_t, float(sched.init_noise_sigma),
                    int(sched.config.num_train_timesteps), train_sigmas, continuous)


def flow_mu(config, image_seq_len: int) -> float:
    """Resolution-dependent shift mu: the Flux/SD3 pipelines' own ``calculate_shift``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                           config.get("max_shift", 1.15))


def _flow_schedule(scheduler, steps: int, sigmas=None, mu=None, image_seq_len=None, timesteps=None) -> Schedule:
    config = scheduler.config
    for flag in ("stochastic_sampling", "invert_sigmas"):
        if config.get(flag, False):
            raise InversionInputError(f"scheduler: {flag}=True is not a deterministic Euler flow "
                                      "sampler this adapter can invert")
    sched = _fresh(scheduler)
    kwargs = {}
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            if image_seq_len is None:
                raise InversionInputError("scheduler: use_dynamic_shifting needs mu (or the latent "
                                          "size, from which mu is computed as pipelines do)")
            mu = flow_mu(config, image_seq_len)
        kwargs["mu"] = mu
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
    if timesteps is not None:
        kwargs["timesteps"] = list(timesteps)
    if sigmas is None and timesteps is None:
        kwargs["num_inference_steps"] = steps
    sched.set_timesteps(**kwargs)
    ascending = sched.sigmas.double().cpu().flip(0)
    ts = sched.timesteps.double().cpu()
    levels_t = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), ts.flip(0)])
    return Schedule("flow", "flow", ascending, levels_t, float(getattr(sched, "init_noise_sigma", 1.0)),
                    int(config.get("num_train_timesteps", 1000)))


