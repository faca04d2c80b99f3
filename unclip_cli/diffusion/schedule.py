"""Gaussian diffusion maths: the cosine schedule, respacing, the forward process and the reverse steps.

A plain object built from betas, after openai/glide-text2im `gaussian_diffusion.py`, with the
papers' names; the one object that both training and sampling use. Two kinds of timestep:

- sampling (`step`, `ddim_step`, ...) takes integer timesteps of a respaced chain, t -> t_prev. The
  ancestral step reproduces diffusers' `UnCLIPScheduler.step` (Karlo's sampler) bit for bit: the
  same float32 operations on 0-d tensors, in the same order. `-1` stands for "the clean sample"
  (alpha_bar = 1) after the last step. The coefficients are 0-d CPU tensors, which enter a CUDA
  kernel as host scalars: a step never waits for the device.
- training (`q_sample`, `q_posterior`, `predict_x0_from_eps`, `learned_log_variance`) takes a
  per-sample t (B,) long on the unskipped chain t -> t - 1, read from tables computed in float64
  and stored as float32 (improved DDPM's numbers). The losses themselves live in `train/losses.py`.

Samplers are in `samplers.py`, DDIM inversion in `inversion.py`, classifier-free guidance in `guidance.py`.
"""

from __future__ import annotations

import math

import torch

from unclip_cli.models.configs import DiffusionConfig

PREDICTIONS = ("eps", "x0")
VARIANCES = ("fixed_small_log", "learned_range")


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) (Nichol & Dhariwal 2021, eq. 17)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_timesteps):
        ratio = alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps)
        betas.append(min(1 - ratio, max_beta))  # python float64 maths, stored as float32 below
    return torch.tensor(betas, dtype=torch.float32)  # (T,)


def respaced_timesteps(num_steps: int, num_timesteps: int = 1000) -> list[int]:
    """Sampling timesteps, descending: round(i * (T-1)/(N-1)), rounding half to even (Karlo's respacing)."""
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"number of sampling steps must be between 2 and {num_timesteps}, got {num_steps}")
    ratio = (num_timesteps - 1) / (num_steps - 1)
    return [round(i * ratio) for i in range(num_steps)][::-1]  # python round() is half-to-even, like numpy


def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (T,) table at t (B,), shaped (B, 1, ...) to broadcast against `like`, in its dtype and device."""
    out = table.to(like.device)[t.to(like.device).long()]  # (B,)
    return out.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


class GaussianDiffusion:
    """The diffusion chain of one model: schedule tensors plus the q / p maths of Ho et al. 2020."""

    def __init__(self, betas: torch.Tensor, config: DiffusionConfig):
        if betas.ndim != 1 or betas.shape[0] != config.num_timesteps:
            raise ValueError(f"expected {config.num_timesteps} betas, got shape {tuple(betas.shape)}")
        if config.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {config.prediction!r}")
        if config.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {config.variance!r}")
        self.config = config
        self.num_timesteps = config.num_timesteps
        self.betas = betas.detach().to("cpu", torch.float32)  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) alpha_bar_t
        self._one = torch.tensor(1.0)  # alpha_bar of the clean sample (t = -1)
        # tables of the unskipped chain t -> t - 1 for batched t (training): float64 maths, stored as float32
        betas64 = self.betas.double()
        abar = torch.cumprod(1 - betas64, dim=0)  # (T,)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # (T,) alpha_bar_{t-1}
        posterior_variance = betas64 * (1 - abar_prev) / (1 - abar)  # (T,); 0 at t = 0
        self.sqrt_alphas_cumprod = abar.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt().float()
        self.sqrt_recip_alphas_cumprod = (1 / abar).sqrt().float()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt().float()
        self.posterior_mean_coef1 = (betas64 * abar_prev.sqrt() / (1 - abar)).float()  # multiplies x_0
        self.posterior_mean_coef2 = ((1 - abar_prev) * (1 - betas64).sqrt() / (1 - abar)).float()  # multiplies x_t
        # the posterior variance is 0 at t = 0: its value at t = 1 stands there (improved DDPM's "clipped")
        self.posterior_log_variance_clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log().float()
        self.log_betas = betas64.log().float()

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "GaussianDiffusion":
        """Build the chain a config describes (only the cosine schedule exists)."""
        if config.schedule != "cosine":
            raise ValueError(f"unknown noise schedule {config.schedule!r} (only 'cosine' is supported)")
        return cls(cosine_betas(config.num_timesteps), config)

    # ---- schedule lookups -------------------------------------------------------------------

    def alpha_bar(self, t: int) -> torch.Tensor:
        """alpha_bar_t as a 0-d float32 tensor; 1 for t = -1 (the clean sample)."""
        t = int(t)
        if t < -1 or t >= self.num_timesteps:
            raise ValueError(f"timestep {t} outside [-1, {self.num_timesteps - 1}]")
        return self.alphas_cumprod[t] if t >= 0 else self._one

    def step_beta(self, t: int, t_prev: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta, alpha) of the step t -> t_prev: beta = 1 - abar_t / abar_prev (Nichol & Dhariwal 2021, sec. 4)."""
        t, t_prev = int(t), int(t_prev)
        if t_prev == t - 1:  # an unskipped step keeps the stored beta_t (as Karlo / diffusers do)
            return self.betas[t], self.alphas[t]
        beta = 1 - self.alpha_bar(t) / self.alpha_bar(t_prev)
        return beta, 1 - beta

    def posterior_variance(self, t: int, t_prev: int) -> torch.Tensor:
        """Variance of q(x_{t_prev} | x_t, x_0): (1 - abar_prev) / (1 - abar_t) * beta (Ho et al. 2020, eq. 7)."""
        beta, _ = self.step_beta(t, t_prev)
        return (1 - self.alpha_bar(t_prev)) / (1 - self.alpha_bar(t)) * beta

    # ---- forward process and the unskipped posterior, per-sample t (B,) (training) ---------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7)."""
        mean = _gather(self.posterior_mean_coef1, t, x0) * x0 + _gather(self.posterior_mean_coef2, t, x0) * x_t
        return mean, _gather(self.posterior_log_variance_clipped, t, x0)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps, unclamped (Ho et al. 2020, eq. 15)."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """frac * log beta_t + (1 - frac) * clipped log posterior variance, frac = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15)."""
        frac = (v + 1) / 2
        return frac * _gather(self.log_betas, t, v) + (1 - frac) * _gather(self.posterior_log_variance_clipped, t, v)

    # ---- reverse process --------------------------------------------------------------------

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 2C, ...) learned-variance output -> (eps or x0, v); v None if fixed (Nichol & Dhariwal 2021)."""
        channels = x_t.shape[1]
        if self.config.variance != "learned_range":
            if model_output.shape[1] != channels:
                raise ValueError(f"model must output {channels} channels on dim 1, got {model_output.shape[1]}")
            return model_output, None
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"learned-variance model must output {2 * channels} channels on dim 1, got {model_output.shape[1]}"
            )
        mean_output, v = torch.split(model_output, channels, dim=1)  # (B, C, ...) each
        return mean_output, v

    def predict_x0(self, x_t: torch.Tensor, t: int, model_output: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, eq. 15) or x0 output, clamped."""
        if model_output.shape[1] != x_t.shape[1]:  # a learned-variance output: drop its v channels
            model_output, _ = self.split_output(model_output, x_t)
        if self.config.prediction == "eps":
            abar_t = self.alpha_bar(t)
            x0 = (x_t - (1 - abar_t) ** 0.5 * model_output) / abar_t**0.5
        else:
            x0 = model_output
        if self.config.clip_range is not None:
            x0 = torch.clamp(x0, -self.config.clip_range, self.config.clip_range)
        return x0

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: int, x0: torch.Tensor) -> torch.Tensor:
        """Noise implied by x_t, x_0: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) (Ho et al. 2020, eq. 4 inverted)."""
        abar_t = self.alpha_bar(t)
        return (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Mean of q(x_{t_prev} | x_t, x_0) for a respaced step (Ho et al. 2020, eq. 7)."""
        abar_t, abar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        beta, alpha = self.step_beta(t, t_prev)
        coef_x0 = (abar_prev**0.5 * beta) / (1 - abar_t)
        coef_xt = alpha**0.5 * (1 - abar_prev) / (1 - abar_t)
        return coef_x0 * x0 + coef_xt * x_t

    def p_log_variance(self, t: int, t_prev: int, v: torch.Tensor | None = None) -> torch.Tensor:
        """log-variance of p(x_{t_prev} | x_t): clipped posterior or learned mix (Nichol & Dhariwal 2021, eq. 15)."""
        if self.config.variance == "fixed_small_log":  # the posterior variance clamped at 1e-20 (Karlo)
            return torch.log(torch.clamp(self.posterior_variance(t, t_prev), min=1e-20))
        if v is None:
            raise ValueError("learned_range variance needs the model's variance channels")
        beta, _ = self.step_beta(t, t_prev)
        min_log = self.posterior_variance(t, t_prev).log()  # Karlo does not clamp here
        max_log = beta.log()
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: int,
        t_prev: int,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral step x_t -> x_{t_prev} (Ho et al. 2020, alg. 2, respaced as Karlo); returns (x_prev, pred_x0)."""
        t, t_prev = int(t), int(t_prev)
        if not -1 <= t_prev < t:
            raise ValueError(f"step needs -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
        mean_output, v = self.split_output(model_output, x_t)
        x0 = self.predict_x0(x_t, t, mean_output)
        x_prev = self.q_posterior_mean(x0, x_t, t, t_prev)
        if t > 0:  # no noise is added when stepping out of t = 0
            if noise is None:
                raise ValueError(f"the ancestral step from t={t} needs noise")
            std = torch.exp(0.5 * self.p_log_variance(t, t_prev, v))
            x_prev = x_prev + std * noise
        return x_prev, x0

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: int,
        t_prev: int,
        eta: float,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM step x_t -> x_{t_prev} (Song et al. 2020, eq. 12); returns (x_prev, pred_x0).

        As in guided-diffusion, eps is re-derived from the clamped x_0; learned-variance channels are ignored.
        """
        t, t_prev = int(t), int(t_prev)
        if not -1 <= t_prev < t:
            raise ValueError(f"ddim_step needs -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
        x0 = self.predict_x0(x_t, t, model_output)  # learned-variance channels are ignored
        eps = self.predict_eps_from_x0(x_t, t, x0)
        abar_t, abar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
        dir_coef = torch.clamp(1 - abar_prev - sigma**2, min=0.0).sqrt()  # direction pointing to x_t
        x_prev = abar_prev.sqrt() * x0 + dir_coef * eps
        if sigma > 0:
            if noise is None:
                raise ValueError(f"DDIM with eta={eta} needs noise for the step from t={t}")
            x_prev = x_prev + sigma * noise
        return x_prev, x0
