"""Caches for each tiny family, built once per test run (shared by the xdist workers)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def family_cache(run_once, synthetic_data, cogtune_home):
    """`family_cache(model, bucket)`: a cache of the synthetic clips for a tiny preset (I2V ones with images)."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    def build(model: str, bucket: str = "9x64x64"):
        def encode(root):
            encode_dataset(EncodeConfig(model=model, output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)),
                                        buckets=(bucket,), validation_prompts=("A red circle moves left.",),
                                        image_noise_samples=2, num_workers=0))

        return run_once(f"family-{model}-{bucket}", encode)

    return build


@pytest.fixture(scope="session")
def condition_image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "red.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(path)
    return path
