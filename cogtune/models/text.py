"""T5 prompt embeddings, computed exactly as the CogVideoX pipelines compute them."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any, Literal

import torch
from accelerate import init_empty_weights

from cogtune.errors import ModelError


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], max_tokens: int,
                   device: Any = None) -> tuple[Any, list[int]]:
    """Embeddings (N, max_tokens, D) padded to `max_tokens`, and each prompt's real token count.

    Like the pipelines' `_get_t5_prompt_embeds`: pad to the model's max length, truncate beyond it,
    and run the encoder without an attention mask. The token count includes the end token and is
    measured before truncation, so a count above `max_tokens` means the caption was cut.
    """
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


def text_encoder_dtype(spec: Any, device: Any, available: int | None | Literal["ask"] = "ask"):
    """The dtype `cogtune encode` runs T5 in: the model's own dtype on a GPU; float32 on a CPU (half
    precision is slow there), or the model's dtype when the host lacks the memory for float32 weights.
    Embeddings computed elsewhere use the same rule, to equal the cached ones on the same machine.

    `available`: host bytes free for T5 (default: asked of the OS; None: unknown, float32). A host
    without room even for the model's dtype is refused in one line before anything loads.
    """
    from cogtune import report
    from cogtune.models.loading import available_host_bytes, torch_dtype

    own = torch_dtype(spec.weight_dtype)
    if torch.device(device).type != "cpu":
        return own
    available = available_host_bytes() if available == "ask" else available
    full = text_encoder_bytes(spec, torch.float32)
    if available is None or host_room_for(full, available):
        return torch.float32
    needed = full // torch.float32.itemsize * own.itemsize
    if own != torch.float32 and host_room_for(needed, available):
        report.info(f"T5 runs in {str(own).removeprefix('torch.')} on the CPU: float32 weights would need "
                    f"{report.binary_size(full)} of host memory, {report.binary_size(available)} is available")
        return own
    raise ModelError(f"the text encoder needs {report.binary_size(needed)} of host memory on the CPU (and "
                     f"{report.binary_size(HOST_MARGIN_BYTES)} to run); {report.binary_size(available)} is available",
                     hint="free host memory, or run on a machine with a GPU that has room for it")


# Room kept for what loading T5 allocates beside its weights (tokenizer, activations, the interpreter).
HOST_MARGIN_BYTES = 2 * 1024**3


def host_room_for(weights: int, available: int) -> bool:
    """Whether `weights` bytes (and `HOST_MARGIN_BYTES`) fit in `available` host bytes."""
    return weights + HOST_MARGIN_BYTES <= available


def text_encoder_bytes(spec: Any, dtype: Any) -> int:
    """Bytes of the T5 encoder's weights in `dtype`, counted on the meta device (nothing allocated)."""
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        encoder = T5EncoderModel(T5Config(**spec.text_encoder_config))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in encoder.parameters()) * itemsize


def embed_prompts(model: Any, prompts: Sequence[str], device: Any) -> tuple[Any, list[int]]:
    """Load the model's tokenizer and T5 on `device`, embed `prompts` as `cogtune encode` does, free T5.

    Returns the embeddings (N, max_tokens, D) on the CPU and each prompt's token count before
    truncation (see `encode_prompts`).
    """
    from cogtune.models.loading import load_text_encoder, load_tokenizer

    tokenizer = load_tokenizer(model)
    text_encoder = load_text_encoder(model, dtype=text_encoder_dtype(model.spec, device), device=device).eval()
    try:
        embeds, counts = encode_prompts(tokenizer, text_encoder, prompts, model.spec.max_text_tokens, device)
        embeds = embeds.cpu()
    finally:
        del text_encoder
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return embeds, counts


def warn_cut_prompts(prompts: Sequence[str], counts: Sequence[int], limit: int, model_name: str,
                     what: str = "prompt") -> None:
    """One warning for the prompts longer than the `limit` tokens the model reads, naming the first and
    how many of its tokens were cut (`counts` as `encode_prompts` returns them)."""
    from cogtune import report

    cut = [(prompt, count - limit) for prompt, count in zip(prompts, counts) if count > limit]
    if not cut:
        return
    prompt, tokens = cut[0]
    shown = prompt if len(prompt) <= 40 else prompt[:39] + "…"
    more = f" ({len(cut)} {what}s in all were cut)" if len(cut) > 1 else ""
    report.warn(f"{what} {shown!r} is longer than the {limit} tokens {model_name} reads: its last "
                f"{tokens} token{'s' if tokens > 1 else ''} were cut{more}")
