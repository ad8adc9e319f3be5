"""Samplers for latent diffusion: DDPM, DDIM and Euler (discrete), in diffusers' conventions.

Papers: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM, arXiv 2006.11239);
Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM, arXiv 2010.02502);
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv 2206.00364). Reference code: huggingface/diffusers `schedulers/scheduling_ddpm.py`,
`scheduling_ddim.py`, `scheduling_euler_discrete.py`; timesteps and updates match them exactly.

Notation: alpha_bar_t = prod_{s<=t} (1 - beta_s) ("alphas_cumprod"). The forward process is
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from minignext.utils import config_from_dict


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"            # "linear", "scaled_linear" (SD) or "squaredcos_cap_v2"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"         # what the UNet predicts: "epsilon", "v_prediction" or "sample"
    timestep_spacing: str = "leading"        # how inference steps are picked: "leading", "trailing", "linspace"
    steps_offset: int = 0
    set_alpha_to_one: bool = True            # DDIM: alpha_bar before step 0 is 1, or alpha_bar_0
    clip_sample: bool = True                 # clamp the predicted x_0 to [-r, r]
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"       # DDPM: "fixed_small" (beta tilde) or "fixed_large" (beta)
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False          # Euler: Karras et al. eq. 5 noise levels

    def __post_init__(self):
        checks = {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
                  "prediction_type": ("epsilon", "v_prediction", "sample"),
                  "timestep_spacing": ("leading", "trailing", "linspace"),
                  "variance_type": ("fixed_small", "fixed_large")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"scheduler {name}={getattr(self, name)!r} is not supported; use one of {allowed}")


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def make_betas(cfg: SchedulerConfig) -> torch.Tensor:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":           # linear in sqrt(beta): LDM's schedule
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    else:                                                # Nichol & Dhariwal 2021, eq. 17
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    if cfg.rescale_betas_zero_snr:                       # Lin et al. 2024, Algorithm 1
        s = torch.cumprod(1 - betas, 0).sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)
        abar = s ** 2
        betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return betas


def spaced_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """The n training steps visited at inference, descending (float64 before rounding)."""
    T = cfg.num_train_timesteps
    if n > T:
        raise ValueError(f"num_inference_steps={n} cannot exceed the {T} training steps")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
    return np.round(np.arange(T, 0, -T / n)) - 1         # trailing: always includes T-1


def q_sample(x0, noise, alpha_bar):
    """DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, sampled in one shot.
    `alpha_bar` is a number or a (B,) tensor."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    alpha_bar = alpha_bar.reshape(alpha_bar.shape + (1,) * (x0.dim() - alpha_bar.dim()))
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def ddim_update(x0, eps, alpha_bar_prev):
    """Song et al. eq. 12 with sigma_t = 0: step to x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
    i.e. keep the predicted noise direction and move to the noise level of the previous step."""
    return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps


class _Scheduler:
    defaults: dict = {}
    order = 1
    init_noise_sigma = 1.0                   # the std of the starting noise

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or config_from_dict(SchedulerConfig, self.defaults)
        self.betas = make_betas(self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)

    @classmethod
    def from_config(cls, config: dict | None = None):
        """From a diffusers scheduler_config.json dict; unknown keys are ignored."""
        return cls(config_from_dict(SchedulerConfig, {**cls.defaults, **(config or {})}))

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(self.config, num_inference_steps).round().astype(np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _predict_x0_eps(self, model_output, sample, alpha_bar):
        """Turn the UNet output into (x_0, eps) estimates; DDPM eq. 15 inverted, or the v-parametrisation
        of Salimans & Ho 2022 (v = sqrt(a) eps - sqrt(1-a) x_0)."""
        kind, beta_bar = self.config.prediction_type, 1 - alpha_bar
        if kind == "epsilon":
            return (sample - beta_bar ** 0.5 * model_output) / alpha_bar ** 0.5, model_output
        if kind == "v_prediction":
            return (alpha_bar ** 0.5 * sample - beta_bar ** 0.5 * model_output,
                    alpha_bar ** 0.5 * model_output + beta_bar ** 0.5 * sample)
        return model_output, (sample - alpha_bar ** 0.5 * model_output) / beta_bar ** 0.5

    def _clip(self, x0):
        r = self.config.clip_sample_range
        return x0.clamp(-r, r) if self.config.clip_sample else x0

    def add_noise(self, original, noise, timesteps):
        abar = self.alphas_cumprod.to(original.device, original.dtype)[timesteps.to(original.device)].flatten()
        return q_sample(original, noise, abar)

    def __len__(self):
        return self.config.num_train_timesteps


class DDPMScheduler(_Scheduler):
    """Ancestral sampling from p(x_{t-1} | x_t) with a fixed variance (DDPM sec. 3.2)."""

    defaults = {"timestep_spacing": "leading"}

    def previous_timestep(self, t):
        if self.num_inference_steps is None:
            return t - 1
        i = int((self.timesteps == t).nonzero()[0][0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output, timestep, sample, generator=None):
        t = int(timestep)
        prev = self.previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        alpha_t = abar_t / abar_prev                 # with skipped steps: the alpha of the whole jump
        beta_t = 1 - alpha_t
        x0 = self._clip(self._predict_x0_eps(model_output, sample, abar_t)[0])
        # posterior mean mu_tilde(x_t, x_0), DDPM eq. 7
        mean = ((abar_prev ** 0.5 * beta_t / (1 - abar_t)) * x0
                + (alpha_t ** 0.5 * (1 - abar_prev) / (1 - abar_t)) * sample)
        if t > 0:
            noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype).to(sample.device)
            if self.config.variance_type == "fixed_small":   # beta_tilde, DDPM eq. 7
                var = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
            else:
                var = beta_t
            mean = mean + var ** 0.5 * noise
        return StepOutput(mean, x0)


class DDIMScheduler(_Scheduler):
    """The deterministic (eta = 0) DDIM update, Song et al. eq. 12."""

    defaults = {"timestep_spacing": "leading"}

    def __init__(self, config=None):
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, timestep, sample, generator=None):
        t = int(timestep)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps    # as diffusers, for every spacing
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self._predict_x0_eps(model_output, sample, abar_t)
        x0 = self._clip(x0)
        return StepOutput(ddim_update(x0, eps, abar_prev), x0)


class EulerDiscreteScheduler(_Scheduler):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al.
    eq. 1 and Algorithm 1), in the variance-exploding scale x = x_t / sqrt(alpha_bar_t),
    sigma = sqrt((1 - alpha_bar) / alpha_bar)."""

    defaults = {"timestep_spacing": "linspace"}

    def __init__(self, config=None):
        super().__init__(config)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = torch.cat([sigmas.flip(0), torch.zeros(1)])
        self.timesteps = torch.linspace(0, len(sigmas) - 1, len(sigmas)).flip(0)
        self.step_index = None

    @property
    def init_noise_sigma(self):
        s = self.sigmas.max()
        return s if self.config.timestep_spacing in ("linspace", "trailing") else (s ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(self.config, num_inference_steps).astype(np.float32)
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas:            # Karras et al. eq. 5, rho = 7
            rho, ramp = 7.0, np.linspace(0, 1, num_inference_steps)
            lo, hi = sigmas[-1].item() ** (1 / rho), sigmas[0].item() ** (1 / rho)
            sigmas = (hi + ramp * (lo - hi)) ** rho
            ts = np.array([self._sigma_to_t(s, np.log(train_sigmas)) for s in sigmas])
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts.astype(np.float32)).to(device)
        self.step_index = None

    @staticmethod
    def _sigma_to_t(sigma, log_sigmas):
        """Invert sigma(t) by linear interpolation in log sigma."""
        log_sigma = np.log(max(sigma, 1e-10))
        low = int(np.clip(np.cumsum(log_sigma - log_sigmas >= 0).argmax(), None, len(log_sigmas) - 2))
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def _index(self, timestep):
        if self.step_index is None:
            hits = (self.timesteps == torch.as_tensor(timestep, dtype=self.timesteps.dtype)).nonzero()
            self.step_index = int(hits[1 if len(hits) > 1 else 0])
        return self.step_index

    def scale_model_input(self, sample, timestep=None):
        """The UNet was trained on x_t = x / sqrt(sigma^2 + 1), not on the VE-scaled x."""
        return sample / ((self.sigmas[self._index(timestep)] ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, generator=None):
        i = self._index(timestep)
        sigma, sample32 = self.sigmas[i], sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            x0 = sample32 - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample32 / (sigma ** 2 + 1)
        else:
            x0 = model_output
        derivative = (sample32 - x0) / sigma                     # Karras et al. Algorithm 1, line 4
        prev = sample32 + derivative * (self.sigmas[i + 1] - sigma)
        self.step_index = i + 1
        return StepOutput(prev.to(model_output.dtype), x0)

    def add_noise(self, original, noise, timesteps):
        idx = [int((self.timesteps == t).nonzero()[0]) for t in timesteps]
        return original + noise * self.sigmas[idx].to(original).view((-1,) + (1,) * (original.dim() - 1))


SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
              "EulerDiscreteScheduler": EulerDiscreteScheduler}


def scheduler_from_config(config: dict, default="DDIMScheduler"):
    """The scheduler a scheduler_config.json names (`_class_name`), else `default` (SD's PNDM has no twin here)."""
    cls = SCHEDULERS.get(config.get("_class_name"), SCHEDULERS[default])
    return cls.from_config(config)
