"""Offline, deterministic tiny CogVideoX pipelines for tests, the demo and quick experiments.

`ensure_tiny_model("tiny")` materializes a real diffusers pipeline folder (transformer, VAE, a
tiny `T5EncoderModel`, a tokenizer built locally, the scheduler) that
`diffusers.CogVideoXPipeline.from_pretrained` (or `CogVideoXImageToVideoPipeline` for the I2V
variants) loads. Weights come from a fixed seed per preset, so every machine builds the same
model. Folders are cached under `$COGTUNE_HOME/models` (default `~/.cache/cogtune/models`) and
written atomically, so concurrent processes (a DDP launch) can ask for the same one.
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import sys
import zlib
from pathlib import Path

import torch

from cogtune.errors import ModelError
from cogtune.fsutil import atomic_directory
from cogtune.models.registry import TINY_PRESETS, ModelSpec

# Bump when the builder or a tiny config changes, so that cached folders are rebuilt.
TINY_BUILD_VERSION = 2

# Words of the synthetic captions (and common English) get their own tokens; everything else
# falls back to single characters, so any printable ASCII caption tokenizes without <unk>.
_WORDS = (
    "a an the of and with in on to at from over under across around is are moving moves slowly quickly "
    "fast slow red green blue yellow orange purple white black gray pink cyan magenta circle square "
    "triangle ball box disk shape shapes left right up down diagonally bouncing spinning background "
    "video clip scene camera person dog cat car tree sky sea water light dark small large big bright"
).split()


def cogtune_home() -> Path:
    return Path(os.environ.get("COGTUNE_HOME", Path.home() / ".cache" / "cogtune"))


def tiny_model_dir(name: str) -> Path:
    return cogtune_home() / "models" / f"{name}-v{TINY_BUILD_VERSION}"


def _seed_for(name: str) -> int:
    return zlib.crc32(name.encode())


def build_tiny_tokenizer(max_length: int):
    """A T5-style Unigram tokenizer over a fixed vocabulary (ids < 512), built without downloads."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {piece for piece, _ in vocab}
    chars = string.ascii_letters + string.digits + string.punctuation
    candidates = (
        [("▁" + w, -3.0) for w in _WORDS]
        + [("▁" + w.capitalize(), -3.5) for w in _WORDS]
        + [("▁" + c, -9.0) for c in chars]
        + [(c, -8.0) for c in chars]
    )
    for piece, score in candidates:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )


def build_tiny_pipeline(spec: ModelSpec):
    """Construct (in memory) the diffusers pipeline of a tiny preset, deterministically."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(spec.name))
        transformer = CogVideoXTransformer3DModel(**spec.transformer_config)
        vae = AutoencoderKLCogVideoX(**spec.vae_config)
        text_encoder = T5EncoderModel(T5Config(**spec.text_encoder_config))
    tokenizer = build_tiny_tokenizer(spec.max_text_tokens)
    scheduler = CogVideoXDDIMScheduler(**spec.scheduler_config)
    pipeline_cls = CogVideoXImageToVideoPipeline if spec.is_i2v else CogVideoXPipeline
    return pipeline_cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def ensure_tiny_model(name: str, destination: str | Path | None = None) -> Path:
    """The folder of tiny preset `name`, built on first use (or into `destination`)."""
    spec = TINY_PRESETS[name]
    target = Path(destination) if destination is not None else tiny_model_dir(name)
    if (target / "model_index.json").is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise ModelError(f"{target} exists and is not a model folder; refusing to overwrite it")
    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    pipeline = build_tiny_pipeline(spec)
    # Saving goes through accelerate's unwrapping, which imports DeepSpeed when installed; DeepSpeed logs
    # to stdout, where `--json` output goes. Its log handler keeps the stream it found: stderr, here.
    with atomic_directory(target) as tmp, contextlib.redirect_stdout(sys.stderr):
        pipeline.save_pretrained(tmp, safe_serialization=True)
        (tmp / "cogtune_preset.json").write_text(
            json.dumps({"preset": name, "builder_version": TINY_BUILD_VERSION}, indent=2) + "\n"
        )
    return target
