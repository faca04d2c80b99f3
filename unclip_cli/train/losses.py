"""Training losses of the diffusion components, after openai/improved-diffusion `gaussian_diffusion.py`
and `losses.py` (Nichol & Dhariwal 2021).

- `x0` prediction (the prior): MSE to the clean sample (Ramesh et al. 2022, sec. 2.2).
- `eps` prediction with a fixed variance (upsamplers): MSE to the noise (Ho et al. 2020, L_simple).
- `eps` prediction with the `learned_range` variance (decoder): the hybrid loss
  L_simple + lambda * L_vlb, lambda = 0.001 (Nichol & Dhariwal 2021, sec. 3.1), where the L_vlb
  term sees the predicted mean through a stop-gradient, so it trains only the variance channels.

Only the losses live here: the forward process, the posterior and the learned log-variance for a
per-sample t (B,) are `GaussianDiffusion`'s (diffusion/schedule.py), the object sampling uses too.
All maths runs in float32 on the unskipped chain (t -> t - 1); tensors are (B, C, ...) with t (B,)
long. The log-variance is the one `GaussianDiffusion.p_log_variance` uses at sampling, with the
posterior variance clipped at t = 0 as improved DDPM does (it is 0 there).
"""

from __future__ import annotations

import math

import torch

from unclip_cli.diffusion.schedule import GaussianDiffusion

VLB_WEIGHT = 0.001  # lambda of the hybrid loss (Nichol & Dhariwal 2021, sec. 3.1)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------- likelihood terms


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF (Page 1977, as in improved DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretized to 255 bins, elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,  # the lowest bin reaches to -inf
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def vb_terms_bpd(
    diffusion: GaussianDiffusion, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """The term L_t of the variational bound, in bits per dimension, (B,): KL(q || p) for t > 0, the
    discretized decoder NLL for t = 0 (Ho et al. 2020, eq. 5; improved DDPM `_vb_terms_bpd`).
    p's mean comes from eps (unclamped x0), its log-variance from v."""
    true_mean, true_log_var = diffusion.q_posterior(x0, x_t, t)
    pred_x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    model_mean, _ = diffusion.q_posterior(pred_x0, x_t, t)
    model_log_var = diffusion.learned_log_variance(v, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, nll, kl)


# ---------------------------------------------------------------------- losses


def diffusion_loss(
    diffusion: GaussianDiffusion,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    vlb_weight: float = VLB_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss a component's DiffusionConfig calls for; returns (scalar loss, {term: scalar}).

    x0 prediction: MSE(output, x0). eps prediction: MSE(output, noise), plus with the learned_range
    variance vlb_weight * T * L_t (L_t in bits/dim, the uniform-t estimate of lambda * L_vlb), computed
    on the stop-gradient eps so that it trains the variance only (Nichol & Dhariwal 2021, sec. 3.1).
    """
    config = diffusion.config
    output = output.float()
    mean_output, v = diffusion.split_output(output, x_t)
    target = x0 if config.prediction == "x0" else noise
    mse = mean_flat((mean_output - target.float()) ** 2).mean()
    if v is None:
        return mse, {"mse": mse.detach()}
    if config.prediction != "eps":
        raise ValueError("the learned_range variance is only trained with eps prediction")
    vb = vb_terms_bpd(diffusion, x0.float(), x_t.float(), t, mean_output.detach(), v).mean()
    vb_scaled = vb * (vlb_weight * diffusion.num_timesteps)
    return mse + vb_scaled, {"mse": mse.detach(), "vb": vb.detach()}
