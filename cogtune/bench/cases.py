"""Benchmark configurations: one `BenchCase` per row of a memory table, and grids of them."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Literal

from cogtune.errors import ConfigError
from cogtune.models.registry import ALL_PRESETS, ModelSpec
from cogtune.train.optimizers import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One training configuration to size (or measure)."""

    model: str
    method: Literal["lora", "full"] = "lora"
    rank: int = 64
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    batch_size: int = 1
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fp8: bool = False
    offload_blocks: bool = False
    offload_activations: bool = False
    validation: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.optimizer}' (known: {', '.join(OPTIMIZERS)})")
        if self.method == "full" and (self.fp8 or self.offload_blocks):
            raise ConfigError("fp8 weights and block offloading are for LoRA (frozen weights)")
        if self.offload_blocks and not self.gradient_checkpointing:
            raise ConfigError("block offloading needs gradient checkpointing")
        if self.batch_size < 1 or self.rank < 1:
            raise ConfigError("batch size and rank must be >= 1")
        self.spec.check_clip_shape(*self.shape)

    @property
    def spec(self) -> ModelSpec:
        return model_spec(self.model)

    @property
    def shape(self) -> tuple[int, int, int]:
        spec = self.spec
        return (self.frames or spec.default_frames, self.height or spec.default_height,
                self.width or spec.default_width)

    @property
    def label(self) -> str:
        method = f"LoRA r{self.rank}" if self.method == "lora" else "full"
        options = [self.optimizer, "ckpt" if self.gradient_checkpointing else "no ckpt"]
        options += [name for name, on in (("fp8", self.fp8), ("offload blocks", self.offload_blocks),
                                          ("offload act.", self.offload_activations)) if on]
        frames, height, width = self.shape
        return f"{self.model} {method}, {', '.join(options)}, b{self.batch_size}, {frames}x{height}x{width}"

    def changes(self, other: BenchCase) -> list[str]:
        """What differs from `other`, in words (for "what would make it fit")."""
        said = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                value = {True: "on", False: "off"}.get(mine, mine) if isinstance(mine, bool) else mine
                said.append(f"{field.name.replace('_', ' ')} {value}")
        return said


@functools.lru_cache(maxsize=32)
def model_spec(reference: str) -> ModelSpec:
    """The spec of a preset, or of a model known by its configs (a local folder or Hub id)."""
    if reference in ALL_PRESETS:
        return ALL_PRESETS[reference]
    from cogtune.models.loading import resolve_model

    return resolve_model(reference, random_weights=True).spec


def parse_list(text: str | None, kind: type, name: str) -> list:
    """`"16,64,256"` -> [16, 64, 256]; `"on,off"` -> [True, False] for booleans."""
    if text is None:
        return []
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if kind is bool:
            if item.lower() not in ("on", "off", "true", "false", "yes", "no"):
                raise ConfigError(f"--{name}: '{item}' is not on or off")
            values.append(item.lower() in ("on", "true", "yes"))
        else:
            try:
                values.append(kind(item))
            except ValueError:
                raise ConfigError(f"--{name}: '{item}' is not a {kind.__name__}") from None
    return values


def grid(models: Sequence[str], methods: Sequence[str], ranks: Sequence[int], optimizers: Sequence[str],
         checkpointing: Sequence[bool], batch_sizes: Sequence[int], shapes: Sequence[tuple[int | None, ...]],
         fp8: Sequence[bool], offload_blocks: Sequence[bool], offload_activations: Sequence[bool],
         validation: bool = True) -> list[BenchCase]:
    """Every combination, skipping those that cannot exist (full fine-tuning with fp8, ...)."""
    cases = []
    for model, method, optimizer, ckpt, batch, shape, f8, blocks, acts in itertools.product(
            models, methods, optimizers, checkpointing, batch_sizes, shapes, fp8, offload_blocks, offload_activations):
        if method == "full" and (f8 or blocks):
            continue
        if blocks and not ckpt:
            continue
        for rank in ranks if method == "lora" else ranks[:1]:
            frames, height, width = shape
            cases.append(BenchCase(model, method, rank, optimizer, ckpt, batch, frames, height, width, f8, blocks, acts,
                                   validation))
    return list(dict.fromkeys(cases))
