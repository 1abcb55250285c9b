"""Which layers a LoRA changed, and by how much: `cogtune lora inspect`'s update table.

Each layer adds `scale * B @ A` to its base weight `W`; its relative update `||scale B A|| / ||W||`
(Frobenius norms) says how far training moved that layer. The base weights are read, tensor by tensor,
from the base model's transformer files when they are on this machine (a tiny preset, a local folder,
or a Hub model already downloaded); otherwise only `||scale B A||` is shown, and the report says so.
A LoRA whose B matrices are all zero (trained with lr 0, or saved before its first step) changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogtune.lora.layouts import LoraLayers

TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"


def layer_updates(lora: LoraLayers, base: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per layer: `update_norm` ||scale B A||, and with the base's weights `weight_norm` ||W|| and `relative`."""
    rows = []
    for module, layer in lora.layers.items():
        update = float(layer.delta().norm())
        weight = base.get(module) if base is not None else None
        weight_norm = float(weight.double().norm()) if weight is not None else None
        rows.append({"module": module, "update_norm": update, "weight_norm": weight_norm,
                     "relative": update / weight_norm if weight_norm else None})
    return rows


def all_b_zero(lora: LoraLayers) -> bool:
    """Whether every B (up) matrix of the LoRA is zero: then it adds nothing to any layer."""
    return all(not bool(layer.up.any()) for layer in lora.layers.values())


def base_weights(model: str | None, modules: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The base weights `W` of `modules` (diffusers module names), and where they came from or why there are none.

    Only what is on this machine is read: nothing is downloaded.
    """
    if not model:
        return None, "the LoRA records no base model: give --model"
    files = _transformer_files(model)
    if files is None:
        return None, f"{model}'s transformer weights are not on this machine"
    from safetensors import safe_open

    wanted = {f"{module}.weight": module for module in modules}
    found: dict[str, Any] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in set(handle.keys()) & set(wanted):
                found[wanted[key]] = handle.get_tensor(key)
    return found, f"{model} ({files[0].parent})"


def _transformer_files(model: str) -> list[Path] | None:
    """The safetensors files of a model's transformer on this machine (nothing is downloaded), or None."""
    from cogtune.models.registry import PRESETS, TINY_PRESETS

    if model in TINY_PRESETS:
        from cogtune.models.tiny import ensure_tiny_model

        return _folder_files(ensure_tiny_model(model) / "transformer")
    if Path(model).expanduser().is_dir():
        return _folder_files(Path(model).expanduser() / "transformer")
    repo = PRESETS[model].hub_id if model in PRESETS else model
    return _cached_hub_files(repo) if repo and "/" in repo else None


def _folder_files(folder: Path) -> list[Path] | None:
    index = folder / f"{TRANSFORMER_WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = [folder / TRANSFORMER_WEIGHTS]
    return files if all(path.is_file() for path in files) else None


def _cached_hub_files(repo: str) -> list[Path] | None:
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Path | None:
        found = try_to_load_from_cache(repo, f"transformer/{name}")
        return Path(found) if isinstance(found, str) else None

    index = cached(f"{TRANSFORMER_WEIGHTS}.index.json")
    if index is None:
        single = cached(TRANSFORMER_WEIGHTS)
        return [single] if single is not None else None
    files = [cached(shard) for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return files if all(path is not None for path in files) else None  # type: ignore[misc]


def inspect_updates(file_or_run: str | Path, layout: str = "auto", model: str | None = None) -> dict[str, Any]:
    """`lora inspect`'s update section: per layer norms, the base used (or why none), whether all B are zero.

    `model`: the base model; default: the one the LoRA records (cogtune's LoRAs do).
    """
    from cogtune.lora.layouts import read_lora, resolve_lora_path

    lora = read_lora(resolve_lora_path(file_or_run), layout)
    base, source = base_weights(model or lora.info.get("model"), list(lora.layers))
    return {"base": source if base is not None else None, "base_note": None if base is not None else source,
            "all_b_zero": all_b_zero(lora), "layers": layer_updates(lora, base)}
