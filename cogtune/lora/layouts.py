"""CogVideoX LoRAs in the four key layouts found in the wild, read and written without loss.

A LoRA is held as `LoraLayers`: for each adapted module, named as in diffusers'
`CogVideoXTransformer3DModel` (`transformer_blocks.3.attn1.to_q`), the down matrix A (rank x in),
the up matrix B (out x rank) and alpha; the layer adds `alpha / rank * B @ A` to the weight.
Every reader produces that, every writer consumes it, so any layout converts to any other.

The layouts (sources in docs/lora-layouts.md):

- `diffusers` (what cogtune trains): `transformer.<module>.lora_A.weight` / `.lora_B.weight`,
  alpha in the `lora_adapter_metadata` header, which diffusers reads from 0.34 on and older
  loaders ignore (they take alpha = rank). The converter therefore folds alpha into B and writes
  alpha = rank, which every diffusers-layout loader applies at the trained strength.
- `comfyui`: ComfyUI's native CogVideoX port (comfy/ldm/cogvideo/model.py): blocks are
  `blocks.N` with `q`, `k`, `v`, `attn_out`, `ff_proj`, `ff_out`, ... ComfyUI's LoRA loader
  (comfy/lora.py, `model_lora_keys_unet` and `load_lora`) maps `diffusion_model.<module>` to the
  weight `diffusion_model.<module>.weight` for any model and reads `.lora_down.weight`,
  `.lora_up.weight` and an `.alpha` tensor (scale alpha / rank; 1 when absent).
- `kohya`: `lora_unet_<diffusers module, dots as underscores>.lora_down.weight` / `.lora_up.weight`
  / `.alpha`, as VideoX-Fun and kohya-style trainers write for CogVideoX (ComfyUI's own
  `lora_unet_` form, with native module names, is read too).
- `sat`: THUDM's SwissArmyTransformer training (CogVideo `sat/`): the LoRA mixin adapts the fused
  `attention.query_key_value` (one A and one B per q, k, v partition: `matrix_A.0..2`,
  `matrix_B.0..2`) and `attention.dense` of `model.diffusion_model.transformer.layers.N`
  (CogVideo `tools/export_sat_lora_weight.py`). No alpha is stored: SAT's default is alpha = 1,
  a scale of 1 / rank (CogVideo `tools/load_cogvideox_lora.py`), so the writer folds the
  trained scale into B for that default. The mixin adapts attention only.

A writer that folds alpha records the trained alpha in the `cogtune` header, and the reader
unfolds it, so `inspect` reports the trained rank and alpha after any round trip.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cogtune.errors import ConfigError, DataError

LAYOUTS = ("diffusers", "comfyui", "kohya", "sat")
# Where a file of each layout loads: `convert` and `inspect` say it, and the README's "Use your LoRA elsewhere".
LOADS_IN = {
    "diffusers": "diffusers (pipe.load_lora_weights), kijai's ComfyUI-CogVideoXWrapper and cogtune sample --lora",
    "comfyui": "native ComfyUI's LoRA loader node (ComfyUI/models/loras)",
    "kohya": "VideoX-Fun and kohya-style tools; not native ComfyUI, whose loader drops every block key "
             "(use --to comfyui there)",
    "sat": "THUDM's SAT CogVideo (sat/, its LoRA mixin); not diffusers or ComfyUI",
}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key (also in cogtune.lora.format)
COGTUNE_METADATA_KEY = "cogtune"
TRAINED_ALPHA_KEY = "trained_alpha"  # in the cogtune header: alpha folded into the weights by a writer

# --- the key correspondences, as data ------------------------------------------------------------
# Per transformer block: (diffusers module, ComfyUI native module, SAT module and q/k/v partition).
# ComfyUI names: the attributes of `CogVideoXBlock` in comfy/ldm/cogvideo/model.py. SAT names: the
# renames of diffusers' scripts/convert_cogvideox_to_diffusers.py (TRANSFORMER_KEYS_RENAME_DICT,
# `query_key_value` split in three) for the layers SAT's LoRA mixin adapts.
BLOCK_MODULES: tuple[tuple[str, str, tuple[str, int] | None], ...] = (
    ("attn1.to_q", "q", ("attention.query_key_value", 0)),
    ("attn1.to_k", "k", ("attention.query_key_value", 1)),
    ("attn1.to_v", "v", ("attention.query_key_value", 2)),
    ("attn1.to_out.0", "attn_out", ("attention.dense", 0)),
    ("ff.net.0.proj", "ff_proj", None),  # SAT: mlp.dense_h_to_4h, outside its LoRA mixin
    ("ff.net.2", "ff_out", None),  # SAT: mlp.dense_4h_to_h
    ("norm1.linear", "norm1.linear", None),  # SAT fuses both blocks' modulations into adaln_layer
    ("norm2.linear", "norm2.linear", None),
)
# Outside the blocks: (diffusers module, ComfyUI native module). `ofs_embedding` exists in
# CogVideoX 1.5-I2V only; `patch_embed.proj` is a Conv2d in 1.0 and a Linear in 1.5.
TOP_MODULES: tuple[tuple[str, str], ...] = (
    ("patch_embed.proj", "patch_embed.proj"),
    ("patch_embed.text_proj", "patch_embed.text_proj"),
    ("time_embedding.linear_1", "time_embedding_linear_1"),
    ("time_embedding.linear_2", "time_embedding_linear_2"),
    ("ofs_embedding.linear_1", "ofs_embedding_linear_1"),
    ("ofs_embedding.linear_2", "ofs_embedding_linear_2"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
)
DIFFUSERS_BLOCK = "transformer_blocks"
COMFY_BLOCK = "blocks"
SAT_BLOCK = "transformer.layers"
COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
SAT_PREFIX = "model.diffusion_model."
DIFFUSERS_PREFIX = "transformer."

_BLOCK_KEY = re.compile(r"^(?P<block>\d+)\.(?P<module>.+)$")


@dataclasses.dataclass
class LoraLayer:
    down: Any  # A: (rank, in_features) or a conv's (rank, in, kh, kw)
    up: Any  # B: (out_features, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self):
        """The weight this layer adds at strength 1: `alpha / rank * B @ A`, in float64."""
        down, up = self.down.double(), self.up.double()
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return self.scale * product.reshape(up.shape[0], *down.shape[1:])


@dataclasses.dataclass
class LoraLayers:
    """A LoRA in no particular layout: layers by diffusers module name, plus what the file said."""

    layers: dict[str, LoraLayer]
    layout: str
    alpha_form: str  # "metadata", "tensors", "folded", "assumed": how the file carried alpha
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # cogtune's record, if any


# --- module names ------------------------------------------------------------------------------
def _split_block(module: str) -> tuple[int, str] | None:
    if not module.startswith(DIFFUSERS_BLOCK + "."):
        return None
    match = _BLOCK_KEY.match(module[len(DIFFUSERS_BLOCK) + 1:])
    return (int(match["block"]), match["module"]) if match else None


def comfy_module(module: str) -> str:
    """ComfyUI's native name of a diffusers module (`transformer_blocks.0.attn1.to_q` -> `blocks.0.q`)."""
    split = _split_block(module)
    if split is not None:
        block, inner = split
        for diffusers_name, comfy_name, _ in BLOCK_MODULES:
            if inner == diffusers_name:
                return f"{COMFY_BLOCK}.{block}.{comfy_name}"
    else:
        for diffusers_name, comfy_name in TOP_MODULES:
            if module == diffusers_name:
                return comfy_name
    raise ConfigError(f"{module} has no counterpart in ComfyUI's native CogVideoX transformer")


def _from_comfy_module(name: str) -> str | None:
    if name.startswith(COMFY_BLOCK + "."):
        match = _BLOCK_KEY.match(name[len(COMFY_BLOCK) + 1:])
        if match:
            for diffusers_name, comfy_name, _ in BLOCK_MODULES:
                if match["module"] == comfy_name:
                    return f"{DIFFUSERS_BLOCK}.{match['block']}.{diffusers_name}"
        return None
    for diffusers_name, comfy_name in TOP_MODULES:
        if name == comfy_name:
            return diffusers_name
    return None


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _from_underscored(name: str) -> str | None:
    """A kohya-style module name back to diffusers' (diffusers or ComfyUI module names, underscored)."""
    name = name.lstrip("_")  # VideoX-Fun writes `lora_unet__transformer_blocks_...` for diffusers keys
    for block_prefix, native in ((DIFFUSERS_BLOCK, False), (COMFY_BLOCK, True)):
        match = re.match(rf"^{block_prefix}_(\d+)_(.+)$", name)
        if match:
            for diffusers_name, comfy_name, _ in BLOCK_MODULES:
                if match[2] == _underscored(comfy_name if native else diffusers_name):
                    return f"{DIFFUSERS_BLOCK}.{match[1]}.{diffusers_name}"
            return None
    for diffusers_name, comfy_name in TOP_MODULES:
        if name in (_underscored(diffusers_name), _underscored(comfy_name)):
            return diffusers_name
    return None


def _sat_module(module: str) -> tuple[str, int]:
    split = _split_block(module)
    if split is not None:
        block, inner = split
        for diffusers_name, _, sat in BLOCK_MODULES:
            if inner == diffusers_name and sat is not None:
                return f"{SAT_BLOCK}.{block}.{sat[0]}", sat[1]
    raise ConfigError(f"{module} has no SAT form: SAT's LoRA mixin adapts attention (q, k, v, out) only",
                      hint="convert to diffusers, comfyui or kohya instead")


# --- reading -------------------------------------------------------------------------------------
def detect_layout(keys: list[str]) -> str:
    """Which layout a state dict's keys are in; a one-line error when none fits."""
    if not keys:
        raise DataError("the file holds no tensors: not a LoRA")
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(".matrix_A." in k or ".matrix_B." in k for k in keys):
        return "sat"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        stripped = [k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in keys]
        if any(k.startswith(COMFY_BLOCK + ".") for k in stripped) or any(k.startswith(COMFY_PREFIX) for k in keys):
            return "comfyui"
        return "diffusers"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "comfyui"
    raise DataError(f"not a CogVideoX LoRA in a known layout ({', '.join(LAYOUTS)}): first key {keys[0]!r}")


def _pairs(state: Mapping[str, Any], down_suffix: str, up_suffix: str, layout: str) -> dict[str, tuple[Any, Any]]:
    """{module: (down, up)} for the keys ending in the two suffixes; other keys (but `.alpha`) are an error."""
    pairs: dict[str, list[Any]] = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            continue
        for index, suffix in ((0, down_suffix), (1, up_suffix)):
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], [None, None])[index] = tensor
                break
        else:
            raise DataError(f"unexpected key {key!r} in a {layout} LoRA")
    incomplete = [name for name, (down, up) in pairs.items() if down is None or up is None]
    if incomplete:
        raise DataError(f"{incomplete[0]} has only one of its two LoRA matrices ({layout} layout)")
    return {name: (down, up) for name, (down, up) in pairs.items()}


def _pattern_value(pattern: Mapping[str, Any], module: str, default: float) -> float:
    """peft's rank/alpha patterns: a key applies to the module it names or ends it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    return float(default)


def _read_diffusers(state: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[dict[str, LoraLayer], str]:
    pairs = _pairs(state, ".lora_A.weight", ".lora_B.weight", "diffusers")
    adapter = {}
    if metadata.get(ADAPTER_METADATA_KEY):
        raw = json.loads(metadata[ADAPTER_METADATA_KEY])
        adapter = {k[len(DIFFUSERS_PREFIX):] if k.startswith(DIFFUSERS_PREFIX) else k: v for k, v in raw.items()}
    layers = {}
    for name, (down, up) in pairs.items():
        module = name[len(DIFFUSERS_PREFIX):] if name.startswith(DIFFUSERS_PREFIX) else name
        rank = int(down.shape[0])
        if "lora_alpha" in adapter:
            alpha = _pattern_value(adapter.get("alpha_pattern") or {}, module, adapter["lora_alpha"])
        else:
            alpha = float(rank)  # what diffusers assumes without the header
        layers[module] = LoraLayer(down, up, alpha)
    return layers, ("metadata" if "lora_alpha" in adapter else "assumed")


def _read_with_alpha_tensors(state: Mapping[str, Any], layout: str, prefix: str, to_diffusers) -> tuple[dict, str]:
    """ComfyUI and kohya: `.lora_down/.lora_up` (or `.lora_A/.lora_B`) plus optional `.alpha` tensors."""
    down_suffix, up_suffix = ".lora_down.weight", ".lora_up.weight"
    if any(k.endswith(".lora_A.weight") for k in state):
        down_suffix, up_suffix = ".lora_A.weight", ".lora_B.weight"
    pairs = _pairs(state, down_suffix, up_suffix, layout)
    layers, forms = {}, set()
    for name, (down, up) in pairs.items():
        bare = name[len(prefix):] if name.startswith(prefix) else name
        module = to_diffusers(bare)
        if module is None:
            raise DataError(f"{name!r} names no CogVideoX transformer module ({layout} layout)")
        alpha_tensor = state.get(f"{name}.alpha")
        # ComfyUI (comfy/lora.py) and kohya apply alpha / rank, and a scale of 1 without `.alpha`.
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(down.shape[0])
        forms.add("tensors" if alpha_tensor is not None else "assumed")
        layers[module] = LoraLayer(down, up, alpha)
    return layers, ("tensors" if forms == {"tensors"} else "assumed")


def _read_sat(state: Mapping[str, Any]) -> tuple[dict[str, LoraLayer], str]:
    pattern = re.compile(r"^(?:model\.diffusion_model\.)?transformer\.layers\.(\d+)\.(attention\.[a-z_]+)\."
                         r"matrix_([AB])\.(\d+)$")
    parts: dict[tuple[int, str, int], dict[str, Any]] = {}
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            raise DataError(f"unexpected key {key!r} in a SAT LoRA")
        parts.setdefault((int(match[1]), match[2], int(match[4])), {})[match[3]] = tensor
    layers = {}
    for (block, sat_name, partition), matrices in sorted(parts.items()):
        module = next((f"{DIFFUSERS_BLOCK}.{block}.{d}" for d, _, sat in BLOCK_MODULES
                       if sat == (sat_name, partition)), None)
        if module is None or set(matrices) != {"A", "B"}:
            raise DataError(f"SAT LoRA key transformer.layers.{block}.{sat_name}.matrix_*.{partition} "
                            "is not a q, k, v or dense LoRA pair")
        down, up = matrices["A"], matrices["B"]
        if not torch.any(down) and not torch.any(up):
            continue  # a partition the writer filled with zeros (SAT adapts q, k and v together)
        layers[module] = LoraLayer(down, up, 1.0)  # SAT's lora_alpha default: scale 1 / rank
    return layers, "assumed"


_LAYOUT_READERS = {
    "diffusers": _read_diffusers,
    "comfyui": lambda state, _: _read_with_alpha_tensors(state, "comfyui", COMFY_PREFIX, _from_comfy_module),
    "kohya": lambda state, _: _read_with_alpha_tensors(state, "kohya", KOHYA_PREFIX, _from_underscored),
    "sat": lambda state, _: _read_sat(state),
}


def read_state(state: Mapping[str, Any], metadata: Mapping[str, str] | None = None, layout: str = "auto") -> LoraLayers:
    """The layers of a LoRA state dict (+ safetensors header) in `layout` (`auto`: detected)."""
    metadata = dict(metadata or {})
    keys = list(state)
    if layout == "auto":
        layout = detect_layout(keys)
    elif layout not in LAYOUTS:
        raise ConfigError(f"unknown LoRA layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    try:
        layers, form = _LAYOUT_READERS[layout](state, metadata)
    except DataError as exc:
        if exc.hint is None:
            try:
                detected = detect_layout(keys)
            except DataError:
                detected = layout
            if detected != layout:
                exc.hint = f"the keys look like the {detected} layout: try --from auto"
        raise
    if not layers:
        raise DataError(f"no LoRA layers in this {layout} file")
    try:
        info = json.loads(metadata.get(COGTUNE_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        info = {}
    info = info if isinstance(info, dict) else {}
    info.pop("layout", None)  # the layout a cogtune writer used: the keys say it again
    trained = info.pop(TRAINED_ALPHA_KEY, None)
    if trained is not None:  # a cogtune writer folded alpha into B: unfold it
        form = "folded"
        for module, layer in layers.items():
            alpha = float(trained.get(module, layer.alpha) if isinstance(trained, dict) else trained)
            layer.up = _scaled(layer.up, layer.scale * layer.rank / alpha)
            layer.alpha = alpha
    return LoraLayers(layers, layout, form, info)


def _scaled(tensor, factor: float):
    """`tensor * factor`, computed in float64 and stored in the tensor's dtype."""
    if factor == 1.0:
        return tensor
    return (tensor.double() * factor).to(tensor.dtype)


def load_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a safetensors file ({str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'})",
                        hint="LoRAs are read from .safetensors; SAT .pt checkpoints: torch.load(weights_only=True), "
                             "then safetensors.torch.save_file") from exc


def resolve_lora_path(file_or_run: str | Path) -> Path:
    """A LoRA file, or the pytorch_lora_weights.safetensors of a run folder."""
    from cogtune.lora.format import LORA_WEIGHTS_NAME

    path = Path(file_or_run)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise DataError(f"LoRA weights not found: {path}")
    return path


def read_lora(path: str | Path, layout: str = "auto") -> LoraLayers:
    state, metadata = load_safetensors(resolve_lora_path(path))
    return read_state(state, metadata, layout)


# --- writing -------------------------------------------------------------------------------------
def _trained_alpha_record(lora: LoraLayers) -> float | dict[str, float]:
    alphas = {module: layer.alpha for module, layer in lora.layers.items()}
    values = set(alphas.values())
    return values.pop() if len(values) == 1 else alphas


def write_state(lora: LoraLayers, layout: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The state dict and safetensors header of `lora` in `layout`, at its trained strength for that
    layout's own loaders (`.alpha` tensors where the layout has them, alpha folded into B where not)."""
    state: dict[str, Any] = {}
    info = dict(lora.info)
    if layout == "diffusers":
        # alpha folded into B; the header says alpha = rank, so readers with and without it agree.
        ranks = {module: layer.rank for module, layer in lora.layers.items()}
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {module: rank for module, rank in ranks.items() if rank != common}
        for module, layer in lora.layers.items():
            state[f"{DIFFUSERS_PREFIX}{module}.lora_A.weight"] = layer.down
            state[f"{DIFFUSERS_PREFIX}{module}.lora_B.weight"] = _scaled(layer.up, layer.scale)
        adapter = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": pattern,
                   "target_modules": sorted(lora.layers), "lora_dropout": 0.0, "bias": "none", "use_dora": False}
        info[TRAINED_ALPHA_KEY] = _trained_alpha_record(lora)
        metadata = {ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in adapter.items()},
                                                     sort_keys=True)}
    elif layout in ("comfyui", "kohya"):
        for module, layer in lora.layers.items():
            name = COMFY_PREFIX + comfy_module(module) if layout == "comfyui" else KOHYA_PREFIX + _underscored(module)
            state[f"{name}.lora_down.weight"] = layer.down
            state[f"{name}.lora_up.weight"] = layer.up
            state[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
        metadata = {}
    elif layout == "sat":
        state = _write_sat(lora)
        info[TRAINED_ALPHA_KEY] = _trained_alpha_record(lora)
        metadata = {}
    else:
        raise ConfigError(f"unknown LoRA layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    metadata = {"format": "pt", **metadata, COGTUNE_METADATA_KEY: json.dumps({**info, "layout": layout},
                                                                              sort_keys=True)}
    return {k: v.contiguous() for k, v in state.items()}, metadata


def _write_sat(lora: LoraLayers) -> dict[str, Any]:
    """SAT's fused qkv gets one (A, B) per partition, all of one rank: missing partitions are zeros,
    lower ranks are padded with zero rows/columns (the delta is unchanged)."""
    groups: dict[str, dict[int, LoraLayer]] = {}
    for module, layer in lora.layers.items():
        name, partition = _sat_module(module)
        groups.setdefault(name, {})[partition] = layer
    state = {}
    for name, partitions in groups.items():
        rank = max(layer.rank for layer in partitions.values())
        count = 3 if name.endswith("query_key_value") else 1
        sample = next(iter(partitions.values()))
        for partition in range(count):
            layer = partitions.get(partition)
            down = torch.zeros((rank, *sample.down.shape[1:]), dtype=sample.down.dtype)
            up = torch.zeros((sample.up.shape[0], rank, *sample.up.shape[2:]), dtype=sample.up.dtype)
            if layer is not None:
                down[: layer.rank] = layer.down
                # SAT scales by 1 / rank (its lora_alpha default of 1): fold the trained scale for that.
                up[:, : layer.rank] = _scaled(layer.up, layer.scale * rank)
            state[f"{SAT_PREFIX}{name}.matrix_A.{partition}"] = down
            state[f"{SAT_PREFIX}{name}.matrix_B.{partition}"] = up
    return state


def write_lora(lora: LoraLayers, layout: str, target: str | Path) -> Path:
    """Write `lora` in `layout` to `target` (a .safetensors file), atomically."""
    from cogtune.fsutil import atomic_path

    state, metadata = write_state(lora, layout)
    target = Path(target)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return target


def save_layouts(lora_file: str | Path, layouts: tuple[str, ...]) -> list[Path]:
    """Beside a run's diffusers LoRA file, the same LoRA in `layouts` (`train --save-format`)."""
    from cogtune.lora.format import LAYOUT_FILE_NAMES

    lora_file = Path(lora_file)
    extra = [layout for layout in layouts if layout != "diffusers"]
    if not extra:
        return []
    lora = read_lora(lora_file, "diffusers")
    return [write_lora(lora, layout, lora_file.parent / LAYOUT_FILE_NAMES[layout]) for layout in extra]


def convert_lora(source: str | Path, target: str | Path, to: str, from_layout: str = "auto") -> LoraLayers:
    """Read `source` in `from_layout` (auto: detected) and write it to `target` in `to`."""
    if to not in LAYOUTS:
        raise ConfigError(f"unknown LoRA layout {to!r}; choose from {', '.join(LAYOUTS)}")
    source, target = Path(source), Path(target)
    lora = read_lora(source, from_layout)
    if target.resolve() == resolve_lora_path(source).resolve():
        raise ConfigError(f"{target} is the input file; write the conversion to another file")
    write_lora(lora, to, target)
    return lora


# --- inspecting ----------------------------------------------------------------------------------
ALPHA_FORMS = {
    "metadata": "in diffusers' lora_adapter_metadata header only (read by diffusers >= 0.34; older and "
                "third-party loaders take alpha = rank)",
    "tensors": "as .alpha tensors (read by ComfyUI and kohya-style loaders)",
    "folded": "folded into the weights (every loader applies the trained strength)",
    "assumed": "not stored: loaders assume their default (alpha = rank; SAT: alpha = 1)",
}


def _candidate_models(lora: LoraLayers) -> list[str]:
    """Presets whose transformer fits the layers' shapes (block count, width, ofs, input channels)."""
    from cogtune.models.registry import ALL_PRESETS

    blocks = [split[0] for split in map(_split_block, lora.layers) if split is not None]
    widths = {int(layer.down.shape[1]) for module, layer in lora.layers.items()
              if module.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"))}
    uses_ofs = any(module.startswith("ofs_embedding.") for module in lora.layers)
    names = []
    for name, spec in ALL_PRESETS.items():
        config = spec.transformer_config
        width = int(config.get("num_attention_heads", 30)) * int(config.get("attention_head_dim", 64))
        if blocks and max(blocks) >= int(config.get("num_layers", 30)):
            continue
        if widths and widths != {width}:
            continue
        if uses_ofs and not spec.uses_ofs:
            continue
        names.append(name)
    return names


# How the frozen base was stored while a LoRA trained (`memory.base_weights`, recorded as `base_weights`; an NF4
# base's library, `memory.nf4_backend`, as `nf4_backend`, bitsandbytes for files that predate it).
_BASE_STORAGE = {"fp8": "an FP8 base (float8 storage)", "int8": "an INT8 base (torchao weight-only int8)",
                 "nf4": "an NF4 base (bitsandbytes 4-bit NormalFloat, double quantization)",
                 "nf4-torchao": "an NF4 base (torchao's NF4 tensor: 4-bit NormalFloat, double quantization)"}


def trained_against(info: Mapping[str, Any]) -> str | None:
    """'trained against an NF4 base (...)' for a LoRA trained on a quantized or float8 base, else None."""
    kind = str(info.get("base_weights", "bf16"))
    storage = _BASE_STORAGE.get(f"{kind}-torchao" if kind == "nf4" and info.get("nf4_backend") == "torchao" else kind)
    return f"trained against {storage}; it loads on the unquantized base like any LoRA" if storage else None


def inspect_lora(file_or_run: str | Path, layout: str = "auto") -> dict[str, Any]:
    """What a LoRA file holds, as plain data (the `cogtune lora inspect --json` document)."""
    path = resolve_lora_path(file_or_run)
    lora = read_lora(path, layout)
    layers = [{"module": module, "rank": layer.rank, "alpha": layer.alpha, "scale": layer.scale,
               "shape": [int(layer.up.shape[0]), *map(int, layer.down.shape[1:])]}
              for module, layer in sorted(lora.layers.items(), key=lambda item: _module_order(item[0]))]
    groups: dict[tuple[int, float], int] = {}
    for layer in lora.layers.values():
        groups[(layer.rank, layer.alpha)] = groups.get((layer.rank, layer.alpha), 0) + 1
    targets = sorted({_target_name(module) for module in lora.layers})
    portable = lora.alpha_form in ("tensors", "folded") or all(l.alpha == l.rank for l in lora.layers.values())
    info = lora.info
    family = info.get("family")
    return {
        "file": str(path),
        "layout": lora.layout,
        "model": info.get("model"),
        "family": family,
        "fits": [info["model"]] if info.get("model") else _candidate_models(lora),
        "layers": len(lora.layers),
        "ranks_alphas": [{"rank": rank, "alpha": alpha, "layers": count} for (rank, alpha), count in sorted(groups.items())],
        "alpha_form": lora.alpha_form,
        "alpha_form_text": ALPHA_FORMS[lora.alpha_form],
        "alpha_portable": portable,
        "loads_in": LOADS_IN[lora.layout],
        "target_modules": targets,
        "buckets": info.get("buckets"),
        "base_weights": info.get("base_weights"),
        "trained_against": trained_against(info),
        "cogtune": info,
        "per_layer": layers,
    }


def _target_name(module: str) -> str:
    split = _split_block(module)
    return split[1] if split is not None else module


def _module_order(module: str) -> tuple[int, str]:
    split = _split_block(module)
    return (split[0], split[1]) if split is not None else (-1, module)
