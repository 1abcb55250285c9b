"""T5 prompt embeddings, computed exactly as the CogVideoX pipelines compute them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], max_tokens: int,
                   device: Any = None) -> tuple[Any, list[int]]:
    """Embeddings (N, max_tokens, D) padded to `max_tokens`, and each prompt's real token count.

    Like the pipelines' `_get_t5_prompt_embeds`: pad to the model's max length, truncate beyond it,
    and run the encoder without an attention mask. The token count includes the end token and is
    measured before truncation, so a count above `max_tokens` means the caption was cut.
    """
    import torch

    device = device if device is not None else text_encoder.device
    prompts = list(prompts)
    untruncated = tokenizer(prompts, add_special_tokens=True).input_ids
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_tokens,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids.to(device))[0]
    return embeds, [len(ids) for ids in untruncated]
