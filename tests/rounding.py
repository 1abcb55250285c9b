"""Tolerances from float32 arithmetic, for two computations that agree in exact arithmetic.

A float32 dot product of length n is off by at most n·u (u = 2^-24) times the sum of its terms'
magnitudes (Higham's gamma_n bound, to first order). Along a chain of such products, each taking
the previous one's output, these relative errors add. Two runs of the same network that differ only
in the order of their float32 operations (a LoRA merged into the weights or added beside them, a
batch of 2 prompts or of 5) therefore differ by about 2 x (the chain's summed dot-product lengths) x u
of the result's scale: the bound below, first order, with the result's largest magnitude as the scale.
A wrong scale, a missing layer or a swapped prompt differs by whole units instead (the tiny models'
LoRAs move the latents by ~0.5; the bound is ~4e-4 of a scale of ~2, the measured difference ~3e-6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UNIT_ROUNDOFF = 2.0**-24  # float32
SCHEDULER_OPS = 8  # a step's elementwise work outside the transformer: guidance, the scheduler's update


def transformer_chain(config: Mapping[str, Any], tokens: int) -> int:
    """The dot-product lengths of one CogVideoX transformer forward, summed along its longest chain.

    Each weight contributes one more rounding (a merged or converted LoRA stores its sum rounded
    to float32), counted as +1 per product.
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    embed = config["time_embed_dim"]
    patch = config["in_channels"] * config.get("patch_size", 2) ** 2 * (config.get("patch_size_t") or 1)
    first = max(patch, config["text_embed_dim"]) + inner + embed  # patch and text embedding; timestep MLP
    # per block: norm1, q/k/v, q.k, scores.v, out, norm2, feed-forward in (inner) and out (4 x inner)
    block = embed + inner + config["attention_head_dim"] + tokens + inner + embed + inner + 4 * inner
    last = embed + inner  # norm_out, proj_out
    products = 3 + 8 * config["num_layers"] + 2
    return first + config["num_layers"] * block + last + products


def t5_chain(config: Mapping[str, Any], tokens: int) -> int:
    """The same for the T5 encoder (RMS norms: d_model; gated feed-forward: d_model in, d_ff out)."""
    d_model, attention = config["d_model"], config["num_heads"] * config["d_kv"]
    block = d_model + d_model + config["d_kv"] + tokens + attention + d_model + d_model + config["d_ff"]
    return config["num_layers"] * (block + 5) + d_model


def denoising_tolerance(spec: Any, steps: int, frames: int, height: int, width: int,
                        text_tokens: int | None = None) -> float:
    """Relative tolerance between two float32 orders of `steps` denoising steps (classifier-free
    guidance runs both halves in one batch, so a step is one forward). With `text_tokens`, the prompt
    embeddings, too, come from two float32 orders of T5."""
    cell = spec.spatial_compression * spec.patch_size
    tokens = (spec.padded_latent_frames(frames) // (spec.patch_size_t or 1) * (height // cell) * (width // cell)
              + spec.max_text_tokens)
    chain = steps * (transformer_chain(spec.transformer_config, tokens) + SCHEDULER_OPS)
    if text_tokens is not None:
        chain += t5_chain(spec.text_encoder_config, text_tokens)
    return 2 * chain * UNIT_ROUNDOFF
