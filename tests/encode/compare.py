"""Compare two cache folders file by file, tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def assert_same_cache(left: Path, right: Path) -> None:
    files_left = sorted(p.relative_to(left).as_posix() for p in left.rglob("*.safetensors"))
    files_right = sorted(p.relative_to(right).as_posix() for p in right.rglob("*.safetensors"))
    assert files_left == files_right
    for name in files_left:
        tensors_left, meta_left = _tensors(left / name)
        tensors_right, meta_right = _tensors(right / name)
        assert meta_left == meta_right, name
        assert tensors_left.keys() == tensors_right.keys(), name
        for key in tensors_left:
            assert torch.equal(tensors_left[key], tensors_right[key]), f"{name}:{key}"
    manifest_left = json.loads((left / "manifest.json").read_text())
    manifest_right = json.loads((right / "manifest.json").read_text())
    for manifest in (manifest_left, manifest_right):
        manifest["model"].pop("location", None)
    assert manifest_left == manifest_right
