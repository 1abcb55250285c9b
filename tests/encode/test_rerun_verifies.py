"""A re-run of `encode` over a cache verifies the files it would keep: a damaged one is encoded again,
with a warning naming it, so "cache ready" is true."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogtune.data.dataset import DatasetConfig
from cogtune.encode import EncodeConfig, encode_dataset
from cogtune.encode.cache import DIGEST_KEY, VideoLatentCache, latent_file, tensor_digest, text_file


def _encode(data, root):
    encode_dataset(EncodeConfig(model="tiny", output_dir=str(root), data=DatasetConfig(root=str(data)),
                                buckets=("9x64x64",), num_workers=0))


def _digests(root):
    return {p.name: tensor_digest(load_file(str(p))) for p in sorted((root / "latents").glob("*.safetensors"))}


def test_a_rerun_encodes_damaged_files_again(tmp_path, synthetic_data, capsys):
    root = tmp_path / "cache"
    _encode(synthetic_data, root)
    before = _digests(root) | {p.name: tensor_digest(load_file(str(p))) for p in (root / "text").glob("*")}

    # Item 0: NaN latents under the same key, with the header's digest re-made to match (hashes forged).
    path = root / latent_file(0)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    tensors["latent_dist"] = torch.full_like(tensors["latent_dist"], float("nan"))
    save_file(tensors, str(path), metadata={**metadata, DIGEST_KEY: tensor_digest(tensors)})
    # Item 1: changed values, header untouched. Item 2's text file: truncated.
    path = root / latent_file(1)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    tensors["latent_dist"] = tensors["latent_dist"] + 1
    save_file(tensors, str(path), metadata=metadata)
    text = root / text_file(2)
    text.write_bytes(text.read_bytes()[:-100])
    capsys.readouterr()

    _encode(synthetic_data, root)
    warnings = capsys.readouterr().err
    assert f"{root / latent_file(0)} holds" in warnings and "non-finite" in warnings
    assert f"{root / latent_file(1)} does not match the digest" in warnings
    assert f"{root / text_file(2)} cannot be read" in warnings
    after = _digests(root) | {p.name: tensor_digest(load_file(str(p))) for p in (root / "text").glob("*")}
    assert after == before  # encoding is deterministic: the damaged files are what they were
    cache = VideoLatentCache(root)
    for index in range(len(cache)):
        assert all(torch.isfinite(t).all() for t in cache.load_item(index).values())
