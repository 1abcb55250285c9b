"""One training step: from cached tensors to the loss, with every random draw made per sample.

Each sample of a micro-batch has its own generator, seeded by (seed, step, micro-step, global
sample index). One process with a batch of 2 therefore draws exactly what two processes with a
batch of 1 draw, and a resumed run draws what the uninterrupted one would have drawn.

A step is two halves: `draw_step_inputs` makes every random draw (clean latents from the cached
posteriors, noise, timesteps, caption and image dropout), and `make_transformer_inputs` builds
the transformer's keyword arguments from them exactly as diffusers' pipelines do when sampling
(tests/train/test_pipeline_oracle.py holds the two side by side, call by call). Text-to-video and
image-to-video differ only in the condition channels, in plain sight in `make_transformer_inputs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from cogtune.models.positions import pad_latent_frames, rotary_embeddings
from cogtune.models.registry import ModelSpec
from cogtune.train.loss import v_prediction_losses

# The condition-image value of `ofs` that CogVideoX 1.5-I2V was trained with (the pipeline's too).
OFS_VALUE = 2.0


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The per-run constants a step needs."""

    caption_dropout: float = 0.0
    image_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Everything random about one micro-batch, drawn on the CPU (reproducible anywhere).

    latents: clean, scaled video latents (B, F, C, H, W), before 1.5's padding.
    noise: (B, F', C, H, W), F' the padded frame count.
    timesteps: (B,) int64.
    prompt_embeds: (B, L, D), after caption dropout.
    image_latents: I2V only: the scaled condition latent (B, 1, C, H, W), after image dropout.
    """

    latents: Any
    noise: Any
    timesteps: Any
    prompt_embeds: Any
    image_latents: Any = None


@dataclasses.dataclass(frozen=True)
class TransformerInputs:
    """The transformer's keyword arguments, plus what the loss needs."""

    kwargs: dict[str, Any]
    noisy_latents: Any  # (B, F', C, H, W): the first `latent_channels` channels of hidden_states
    target_latents: Any  # the clean latents, padded like the noisy ones
    padding: int  # frames prepended for 1.5's temporal patch (not trained on)


def derive_seed(*parts: Any) -> int:
    """A seed that depends only on `parts` (Python's `hash` of strings changes between processes)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def sample_generators(seed: int, step: int, micro: int, first_index: int, count: int) -> list[Any]:
    """One CPU generator per sample, keyed by the sample's global position in the step's batch."""
    return [torch.Generator().manual_seed(derive_seed(seed, step, micro, first_index + i, "sample"))
            for i in range(count)]


def sample_latents(latent_dist: Any, scale: float, generators: list[Any]) -> Any:
    """Latents drawn from cached posteriors (B, 2C, F, H, W) -> scaled (B, F, C, H, W)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    draws = [DiagonalGaussianDistribution(latent_dist[i : i + 1].float()).sample(generator=g)
             for i, g in enumerate(generators)]
    return (torch.cat(draws) * scale).permute(0, 2, 1, 3, 4)


def condition_latent_dist(batch: dict[str, Any], generators: list[Any]) -> Any:
    """The condition image's posterior: one of the cached noise-augmented encodes per sample, or the clean one."""
    noised = batch.get("image_latent_dist_noised")
    if noised is None:
        return batch["image_latent_dist"]
    picks = [int(torch.randint(0, noised.shape[1], (1,), generator=g)) for g in generators]
    return torch.stack([noised[i, pick] for i, pick in enumerate(picks)])


def draw_step_inputs(spec: ModelSpec, scheduler: Any, batch: dict[str, Any], empty_embeds: Any,
                     settings: StepSettings, generators: list[Any]) -> StepInputs:
    """Every random draw of a micro-batch, each from its sample's own generator."""
    latents = sample_latents(batch["latent_dist"], spec.video_latent_scale, generators)
    noise_shape = (spec.padded_latent_count(latents.shape[1]), *latents.shape[2:])
    noise = torch.stack([torch.randn(noise_shape, generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                           for g in generators])
    prompt_embeds = batch["prompt_embeds"].float()
    if settings.caption_dropout > 0:
        drop = torch.tensor([bool(torch.rand(1, generator=g) < settings.caption_dropout) for g in generators])
        prompt_embeds = torch.where(drop[:, None, None], empty_embeds.float()[None], prompt_embeds)
    image_latents = None
    if spec.is_i2v:
        image_latents = sample_latents(condition_latent_dist(batch, generators), spec.image_latent_scale, generators)
        keep = torch.tensor([float(torch.rand(1, generator=g) >= settings.image_dropout) for g in generators])
        image_latents = image_latents * keep[:, None, None, None, None]
    return StepInputs(latents, noise, timesteps, prompt_embeds, image_latents)


def make_transformer_inputs(spec: ModelSpec, scheduler: Any, inputs: StepInputs, device: Any,
                            dtype: Any) -> TransformerInputs:
    """The transformer's inputs for a training step, laid out as the pipelines lay them out.

    1.5 pads the latents to a multiple of its temporal patch by prepending frames; the pipelines
    prepend noise and drop those frames after sampling, so training prepends copies of the first
    frame (as THUDM's finetune does) and leaves them out of the loss.

    I2V: the condition is a zero tensor shaped like the (padded) video latents with the image
    latent in its first frame only, concatenated on channels. The I2V pipeline builds exactly this,
    also for 1.5: the image sits in frame 0, which is a padding frame there.
    """
    latents, padding = pad_latent_frames(spec, inputs.latents.to(device))
    noise, timesteps = inputs.noise.to(device), inputs.timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden_states = noisy
    if spec.is_i2v:
        condition = torch.zeros_like(noisy)
        condition[:, :1] = inputs.image_latents.to(device)
        hidden_states = torch.cat([noisy, condition], dim=2)
    batch_size, frames, _, height, width = noisy.shape
    kwargs = {
        "hidden_states": hidden_states.to(dtype=dtype),
        "encoder_hidden_states": inputs.prompt_embeds.to(device=device, dtype=dtype),
        "timestep": timesteps,
        "ofs": torch.full((batch_size,), OFS_VALUE, device=device, dtype=dtype) if spec.uses_ofs else None,
        "image_rotary_emb": rotary_embeddings(spec, frames, height, width, device=device),
    }
    return TransformerInputs(kwargs, noisy, latents, padding)


def training_step(transformer: Any, scheduler: Any, spec: ModelSpec, batch: dict[str, Any], empty_embeds: Any,
                  settings: StepSettings, generators: list[Any], device: Any, dtype: Any,
                  per_sample: list[tuple[int, float]] | None = None) -> Any:
    """Loss of one micro-batch; every random draw comes from the sample's own generator (on the CPU).

    `per_sample`, when given, receives each sample's (timestep, loss): the loss by timestep range.
    """
    inputs = make_transformer_inputs(spec, scheduler, draw_step_inputs(spec, scheduler, batch, empty_embeds,
                                                                       settings, generators), device, dtype)
    output = transformer(**inputs.kwargs, return_dict=False)[0]
    losses = prediction_losses(output, inputs, scheduler)
    if per_sample is not None:
        per_sample += zip(inputs.kwargs["timestep"].tolist(), losses.detach().float().tolist(), strict=True)
    return losses.mean()


def prediction_losses(output: Any, inputs: TransformerInputs, scheduler: Any) -> Any:
    """Each sample's training loss for the transformer's `output` on `inputs` (B,)."""
    # 1.5's padding frames are dropped after sampling, so they are not trained on either.
    frame_mask = None
    if inputs.padding:
        batch_size, frames = inputs.noisy_latents.shape[:2]
        frame_mask = torch.ones(batch_size, frames, device=inputs.noisy_latents.device)
        frame_mask[:, : inputs.padding] = 0
    return v_prediction_losses(output, inputs.noisy_latents, inputs.target_latents, inputs.kwargs["timestep"],
                               scheduler, frame_mask=frame_mask)
