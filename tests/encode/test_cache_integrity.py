"""Cache integrity: the manifest's records, per-file verification on first load, structure and path checks."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogtune.encode import VideoLatentCache
from cogtune.encode.cache import INTEGRITY_KEY, MANIFEST_NAME, tensor_digest
from cogtune.errors import DataError


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(tiny_cache, root)
    return root


def _manifest(root):
    return json.loads((root / MANIFEST_NAME).read_text())


def _write_manifest(root, manifest):
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


def _strip_integrity(root):
    """The manifest as cogtune wrote it before it recorded digests and shapes."""
    manifest = _manifest(root)
    manifest.pop(INTEGRITY_KEY, None)
    for item in manifest["items"]:
        item.pop(INTEGRITY_KEY, None)
    _write_manifest(root, manifest)


def _zero_data(path):
    """Zero a safetensors file's data section, leaving its header intact."""
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header:] = bytes(len(data) - 8 - header)
    path.write_bytes(bytes(data))


def _error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = info.value.message
    assert "\n" not in message
    return message


def test_manifest_records_size_digest_and_shapes(tiny_cache):
    manifest = _manifest(tiny_cache)
    item = manifest["items"][0]
    record = item[INTEGRITY_KEY][item["latent_file"]]
    path = tiny_cache / item["latent_file"]
    assert record["bytes"] == path.stat().st_size
    assert record["sha256"] == tensor_digest(load_file(path))
    assert record["tensors"] == {"latent_dist": {"dtype": "float32", "shape": [8, 3, 8, 8]}}
    assert item[INTEGRITY_KEY][item["text_file"]]["tensors"]["prompt_embeds"]["shape"] == [32, 32]
    assert set(manifest[INTEGRITY_KEY]) == {"text/empty.safetensors", "text/validation.safetensors"}


@pytest.mark.parametrize("old_manifest", [False, True])
def test_zeroed_latent_data_is_refused_naming_the_file_and_clip(cache_copy, old_manifest):
    if old_manifest:
        _strip_integrity(cache_copy)
    _zero_data(cache_copy / "latents" / "000001.safetensors")
    cache = VideoLatentCache(cache_copy)
    cache.load_item(0)
    message = _error(lambda: cache.load_item(1))
    assert str(cache_copy / "latents" / "000001.safetensors") in message
    assert "videos/clip_001.mp4, videos.txt:2" in message and "all zeros" in message


@pytest.mark.parametrize("old_manifest", [False, True])
def test_latents_of_another_shape_than_the_bucket_are_refused(cache_copy, old_manifest):
    path = cache_copy / "latents" / "000002.safetensors"
    save_file({"latent_dist": torch.randn(8, 2, 8, 8)}, str(path))
    manifest = _manifest(cache_copy)
    if not old_manifest:  # even a manifest that agrees with the file: the bucket decides
        manifest["items"][2][INTEGRITY_KEY][manifest["items"][2]["latent_file"]] = None
    _write_manifest(cache_copy, manifest)
    if old_manifest:
        _strip_integrity(cache_copy)
    message = _error(lambda: VideoLatentCache(cache_copy).load_item(2))
    assert str(path) in message and "(8, 2, 8, 8)" in message and "bucket 9x64x64 needs (8, 3, 8, 8)" in message


def test_changed_values_fail_the_digest(cache_copy):
    path = cache_copy / "latents" / "000003.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors["latent_dist"][0, 0, 0, 0] += 0.5
    save_file(tensors, str(path), metadata=metadata)  # same size, finite, not zero: only the digest tells
    message = _error(lambda: VideoLatentCache(cache_copy).load_item(3))
    assert str(path) in message and "digest" in message


def test_non_finite_values_are_refused(cache_copy):
    _strip_integrity(cache_copy)
    path = cache_copy / "text" / "000000.safetensors"
    tensors = load_file(path)
    tensors["prompt_embeds"][3, 1] = float("nan")
    tensors["prompt_embeds"][4, 1] = float("inf")
    save_file(tensors, str(path))
    message = _error(lambda: VideoLatentCache(cache_copy).load_item(0))
    assert str(path) in message and "2 non-finite values" in message and "prompt_embeds" in message


def test_truncated_file_is_refused_by_size(cache_copy):
    path = cache_copy / "latents" / "000000.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    message = _error(lambda: VideoLatentCache(cache_copy).load_item(0))
    assert str(path) in message and "bytes" in message


def test_old_manifest_without_records_still_loads(cache_copy):
    _strip_integrity(cache_copy)
    cache = VideoLatentCache(cache_copy)
    assert cache.load_item(0)["latent_dist"].shape == (8, 3, 8, 8)
    assert cache.empty_prompt_embeds().shape == (32, 32)
    assert cache.validation_prompt_embeds().shape == (1, 32, 32)


def test_digest_is_checked_once_per_file_per_process(cache_copy, monkeypatch):
    import cogtune.encode.cache as cache_module

    calls = []
    real = cache_module.tensor_digest
    monkeypatch.setattr(cache_module, "tensor_digest", lambda tensors: calls.append(1) or real(tensors))
    cache = VideoLatentCache(cache_copy)
    for _ in range(3):
        cache.load_item(1)
    assert len(calls) == 2  # its latent file and its text file, the first time only


@pytest.mark.parametrize("manifest, expected", [
    ([1, 2], "not a cogtune cache manifest (an array at the top level, not an object)"),
    ("drop-items", "'items' must be an array, found missing"),
    ("items-object", "'items' must be an array, found an object"),
    ("item-string", "item 1 is a string, not an object"),
    ("no-text-file", "item 0's text_file is missing or not a string"),
    ("bad-bucket", "item 2's bucket '1x2' is not one of the cache's buckets"),
    ("buckets-string", "'buckets' must be an array, found a string"),
])
def test_manifest_structure_errors_are_one_line(cache_copy, manifest, expected):
    data = _manifest(cache_copy)
    if manifest == "drop-items":
        del data["items"]
    elif manifest == "items-object":
        data["items"] = {"0": data["items"][0]}
    elif manifest == "item-string":
        data["items"][1] = "latents/000001.safetensors"
    elif manifest == "no-text-file":
        del data["items"][0]["text_file"]
    elif manifest == "bad-bucket":
        data["items"][2]["bucket"] = "1x2"
    elif manifest == "buckets-string":
        data["buckets"] = "9x64x64"
    else:
        data = manifest
    _write_manifest(cache_copy, data)
    message = _error(lambda: VideoLatentCache(cache_copy))
    assert message.startswith(str(cache_copy / MANIFEST_NAME)) and expected in message


@pytest.mark.parametrize("latent_file", ["/etc/passwd", "../outside.safetensors", "latents/../../outside.safetensors",
                                         "C:\\outside.safetensors"])
def test_latent_file_outside_the_cache_is_refused(cache_copy, latent_file):
    data = _manifest(cache_copy)
    data["items"][0]["latent_file"] = latent_file
    _write_manifest(cache_copy, data)
    message = _error(lambda: VideoLatentCache(cache_copy))
    assert message.startswith(str(cache_copy / MANIFEST_NAME)) and "leads outside the cache folder" in message


def test_latent_file_escaping_through_a_symlink_is_refused(cache_copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(cache_copy / "latents" / "000000.safetensors", outside)
    link = cache_copy / "latents" / "000000.safetensors"
    link.unlink()
    os.symlink(outside, link)
    inside = cache_copy / "moved" / "000001.safetensors"  # a link that stays inside the cache is fine
    inside.parent.mkdir()
    (cache_copy / "latents" / "000001.safetensors").rename(inside)
    os.symlink(inside, cache_copy / "latents" / "000001.safetensors")
    cache = VideoLatentCache(cache_copy)
    message = _error(lambda: cache.load_item(0))
    assert message.startswith(str(cache_copy / MANIFEST_NAME)) and "symbolic link" in message
    assert cache.load_item(1)["latent_dist"].shape == (8, 3, 8, 8)


def test_training_on_a_damaged_manifest_is_one_line(cli, cache_copy, tmp_path):
    _write_manifest(cache_copy, [])
    result = cli("train", "t2v", "--model", "tiny", "--data", cache_copy, "--output-dir", tmp_path / "run",
                 "--steps", "1")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
