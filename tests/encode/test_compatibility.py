"""A cache serves every spelling of the model it was made for, and names what differs in words otherwise."""

from __future__ import annotations

import pytest

from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import DataError
from cogtune.models.loading import resolve_model
from cogtune.models.registry import TINY_PRESETS


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, synthetic_data, cogtune_home):
    """A cache encoded with the tiny model's *folder* (as the demo does), not the `tiny` preset."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset
    from cogtune.models.tiny import ensure_tiny_model

    folder = ensure_tiny_model("tiny", tmp_path_factory.mktemp("model") / "tiny")
    root = tmp_path_factory.mktemp("cache") / "folder"
    encode_dataset(EncodeConfig(model=str(folder), output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)),
                                buckets=("9x64x64",), num_workers=0))
    return root, folder


def test_the_preset_and_its_folder_share_a_cache(folder_cache):
    root, folder = folder_cache
    cache = VideoLatentCache(root)
    cache.check_compatible(TINY_PRESETS["tiny"])  # the preset of the model the folder holds
    cache.check_compatible(resolve_model(str(folder)).spec)


def test_another_model_is_named_in_words(folder_cache):
    root, _ = folder_cache
    with pytest.raises(DataError) as caught:
        VideoLatentCache(root).check_compatible(TINY_PRESETS["tiny-rotary"])
    message = caught.value.message
    assert "which is incompatible with tiny-rotary (scaling_factor 1.15258426 vs 0.7" in message
    assert "architecture '" not in message  # no hashes


def test_the_demo_cache_trains_with_the_tiny_preset(cli, folder_cache, tmp_path):
    root, _ = folder_cache
    result = cli("train", "t2v", "--model", "tiny", "--data", root, "--output-dir", tmp_path / "run", "--steps", "1",
                 "--rank", "4")
    assert result.exit_code == 0, result.stderr
