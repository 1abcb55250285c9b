"""One training step: from cached tensors to the loss, with every random draw made per sample.

Each sample of a micro-batch has its own generator, seeded by (seed, step, micro-step, global
sample index). One process with a batch of 2 therefore draws exactly what two processes with a
batch of 1 draw, and a resumed run draws what the uninterrupted one would have drawn.

Text-to-video and image-to-video differ only in `make_model_input`, in plain sight.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from cogtune.models.positions import pad_latent_frames, rotary_embeddings
from cogtune.models.registry import ModelSpec
from cogtune.train.loss import compute_v_prediction_loss

# The condition-image value of `ofs` that CogVideoX 1.5-I2V was trained with (the pipeline's too).
OFS_VALUE = 2.0


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The per-run constants a step needs."""

    caption_dropout: float = 0.0
    image_dropout: float = 0.0


def derive_seed(*parts: Any) -> int:
    """A seed that depends only on `parts` (Python's `hash` of strings changes between processes)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def sample_generators(seed: int, step: int, micro: int, first_index: int, count: int) -> list[Any]:
    """One CPU generator per sample, keyed by the sample's global position in the step's batch."""
    import torch

    return [torch.Generator().manual_seed(derive_seed(seed, step, micro, first_index + i, "sample"))
            for i in range(count)]


def sample_latents(latent_dist: Any, scale: float, generators: list[Any]) -> Any:
    """Latents drawn from cached posteriors (B, 2C, F, H, W) -> scaled (B, F, C, H, W)."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    draws = [DiagonalGaussianDistribution(latent_dist[i : i + 1].float()).sample(generator=g)
             for i, g in enumerate(generators)]
    return (torch.cat(draws) * scale).permute(0, 2, 1, 3, 4)


def condition_latent_dist(batch: dict[str, Any], generators: list[Any]) -> Any:
    """The condition image's posterior: one of the cached noise-augmented encodes per sample, or the clean one."""
    import torch

    noised = batch.get("image_latent_dist_noised")
    if noised is None:
        return batch["image_latent_dist"]
    picks = [int(torch.randint(0, noised.shape[1], (1,), generator=g)) for g in generators]
    return torch.stack([noised[i, pick] for i, pick in enumerate(picks)])


def make_model_input(spec: ModelSpec, noisy_latents: Any, batch: dict[str, Any], generators: list[Any],
                     padding: int, image_dropout: float) -> Any:
    """The transformer's `hidden_states`: the noisy latents, plus the condition image for I2V.

    I2V, as the I2V pipeline builds it: the condition latent sits in the first frame of a zero tensor
    shaped like the video latents, concatenated on channels; 1.5's padding frame (prepended) repeats
    the condition latent. The image is dropped (zeroed) with probability `image_dropout`.
    """
    import torch

    if not spec.is_i2v:
        return noisy_latents
    image = sample_latents(condition_latent_dist(batch, generators), spec.image_latent_scale, generators)
    keep = torch.tensor([float(torch.rand(1, generator=g) >= image_dropout) for g in generators])
    image = image * keep[:, None, None, None, None]
    condition = torch.zeros_like(noisy_latents)
    condition[:, : padding + 1] = image.to(noisy_latents.device)
    return torch.cat([noisy_latents, condition], dim=2)


def training_step(transformer: Any, scheduler: Any, spec: ModelSpec, batch: dict[str, Any], empty_embeds: Any,
                  settings: StepSettings, generators: list[Any], device: Any, dtype: Any) -> Any:
    """Loss of one micro-batch; every random draw comes from the sample's own generator (on the CPU)."""
    import torch

    latents = sample_latents(batch["latent_dist"], spec.video_latent_scale, generators)
    latents, padding = pad_latent_frames(spec, latents)
    batch_size, frames, _, height, width = latents.shape
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                           for g in generators])
    # Draws happen on the CPU (reproducible anywhere); the arithmetic on the device.
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    prompt_embeds = batch["prompt_embeds"].float()
    if settings.caption_dropout > 0:
        drop = torch.tensor([bool(torch.rand(1, generator=g) < settings.caption_dropout) for g in generators])
        prompt_embeds = torch.where(drop[:, None, None], empty_embeds.float()[None], prompt_embeds)

    model_input = make_model_input(spec, noisy, batch, generators, padding, settings.image_dropout)
    output = transformer(
        hidden_states=model_input.to(device=device, dtype=dtype),
        encoder_hidden_states=prompt_embeds.to(device=device, dtype=dtype),
        timestep=timesteps,
        ofs=torch.full((batch_size,), OFS_VALUE, device=device, dtype=dtype) if spec.uses_ofs else None,
        image_rotary_emb=rotary_embeddings(spec, frames, height, width, device=device),
        return_dict=False,
    )[0]
    # 1.5's padding frame is dropped after sampling, so it is not trained on either.
    frame_mask = None
    if padding:
        frame_mask = torch.ones(batch_size, frames, device=device)
        frame_mask[:, :padding] = 0
    return compute_v_prediction_loss(output, noisy, latents, timesteps, scheduler, frame_mask=frame_mask)
