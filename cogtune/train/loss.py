"""The CogVideoX training objective.

CogVideoX is trained with v-prediction on a DDIM schedule with zero terminal SNR. With
`a = alphas_cumprod[t]`, a clean latent `x0` and Gaussian noise `e`:

    x_t = sqrt(a) x0 + sqrt(1 - a) e            (scheduler.add_noise)
    v   = sqrt(a) e  - sqrt(1 - a) x0           (the target the model predicts)

diffusers' `get_velocity(sample, noise, t)` computes `sqrt(a) noise - sqrt(1 - a) sample`. Called
as `get_velocity(v_pred, x_t, t)` it gives `sqrt(a) x_t - sqrt(1 - a) v_pred`, which for the true
velocity is

    sqrt(a) (sqrt(a) x0 + sqrt(1 - a) e) - sqrt(1 - a) (sqrt(a) e - sqrt(1 - a) x0)
      = a x0 + (1 - a) x0 = x0,

so it turns the model output into an estimate of `x0`. Its error is proportional to the velocity
error: `x0_pred - x0 = -sqrt(1 - a) (v_pred - v)`. Weighting the squared x0 error by
`1 / (1 - a)` therefore gives exactly the squared velocity error:

    (1 / (1 - a)) |x0_pred - x0|^2 = |v_pred - v|^2.

We compute the x0 form (as CogVideoX's own training and diffusers' examples do) in float32; at
`t = 0` with the zero-SNR schedule `1 - a` is small but positive, and the weight stays finite.
"""

from __future__ import annotations

from typing import Any

import torch


def compute_v_prediction_loss(model_output: Any, noisy_latents: Any, latents: Any, timesteps: Any,
                              scheduler: Any, frame_mask: Any = None) -> Any:
    """Mean over the batch of `1/(1 - a_t)`-weighted MSE between the x0 estimate and `latents`.

    `model_output`, `noisy_latents` and `latents` are (B, F, C, H, W); `frame_mask` (B, F), when
    given, excludes padding frames from the mean.
    """
    return v_prediction_losses(model_output, noisy_latents, latents, timesteps, scheduler, frame_mask).mean()


def v_prediction_losses(model_output: Any, noisy_latents: Any, latents: Any, timesteps: Any,
                        scheduler: Any, frame_mask: Any = None) -> Any:
    """`compute_v_prediction_loss` per sample (B,), before the batch's mean."""
    model_output = model_output.float()
    noisy_latents = noisy_latents.float()
    latents = latents.float()
    x0_pred = scheduler.get_velocity(model_output, noisy_latents, timesteps)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    weights = 1.0 / (1.0 - alphas_cumprod[timesteps.to(latents.device)])
    squared = (x0_pred - latents) ** 2
    if frame_mask is None:
        per_sample = squared.flatten(1).mean(dim=1)
    else:
        mask = frame_mask.to(squared.dtype)[:, :, None, None, None].expand_as(squared)
        per_sample = (squared * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1)
    return weights * per_sample
