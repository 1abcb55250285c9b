"""The v-prediction objective: the x0 form weighted by 1/(1 - a_t) equals the velocity MSE."""

from __future__ import annotations

import torch

from cogtune.models.loading import load_scheduler, resolve_model
from cogtune.train.loss import compute_v_prediction_loss


def _setup(name="cogvideox-5b"):
    scheduler = load_scheduler(resolve_model(name, random_weights=True))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 2, 4, 6, 6, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    return scheduler, latents, noisy, velocity, timesteps, generator


def test_true_velocity_gives_zero_loss():
    scheduler, latents, noisy, velocity, timesteps, _ = _setup()
    loss = compute_v_prediction_loss(velocity, noisy, latents, timesteps, scheduler)
    assert loss.item() < 1e-8


def test_weighted_x0_loss_equals_velocity_mse():
    scheduler, latents, noisy, velocity, timesteps, generator = _setup("cogvideox-2b")
    prediction = velocity + 0.3 * torch.randn(velocity.shape, generator=generator)
    loss = compute_v_prediction_loss(prediction, noisy, latents, timesteps, scheduler)
    expected = ((prediction - velocity) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_scheduler_is_the_models_own():
    two = load_scheduler(resolve_model("cogvideox-2b", random_weights=True))
    five = load_scheduler(resolve_model("cogvideox-5b", random_weights=True))
    assert two.config.prediction_type == five.config.prediction_type == "v_prediction"
    assert (two.config.snr_shift_scale, five.config.snr_shift_scale) == (3.0, 1.0)
    assert two.config.rescale_betas_zero_snr and float(two.alphas_cumprod[-1]) < 1e-6


def test_frame_mask_excludes_padding():
    scheduler, latents, noisy, velocity, timesteps, _ = _setup()
    prediction = velocity.clone()
    prediction[:, 0] += 5.0  # error only in frame 0
    mask = torch.tensor([[0.0, 1.0]] * 3)
    assert compute_v_prediction_loss(prediction, noisy, latents, timesteps, scheduler, frame_mask=mask) < 1e-8
    assert compute_v_prediction_loss(prediction, noisy, latents, timesteps, scheduler) > 1.0
