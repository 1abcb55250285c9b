"""LoRAs with alpha != rank on the tiny presets, and diffusers' own reading of them (the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Every Linear (and 1.0's Conv2d patch embedding) of diffusers' CogVideoXTransformer3DModel.
ALL_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm2.linear",
               "patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2",
               "ofs_embedding.linear_1", "ofs_embedding.linear_2", "norm_out.linear", "proj_out")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FAMILIES = ("tiny", "tiny-rotary", "tiny-i2v", "tiny-1.5", "tiny-1.5-i2v")
RANK, ALPHA = 4, 12.0


def base_transformer(preset: str, dtype=None):
    """The preset's transformer architecture with fixed random weights (same for every call)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from cogtune.models.registry import TINY_PRESETS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        transformer = CogVideoXTransformer3DModel(**TINY_PRESETS[preset].transformer_config)
    return transformer.to(dtype or torch.float32)


def write_trained_lora(folder: Path, preset: str, targets=ALL_LINEARS, rank: int = RANK, alpha: float = ALPHA,
                       seed: int = 0) -> Path:
    """A cogtune LoRA file (random A and B, alpha != rank), written by cogtune's own trainer format."""
    import torch
    from peft import LoraConfig

    from cogtune.lora.format import save_lora
    from cogtune.models.registry import TINY_PRESETS

    spec = TINY_PRESETS[preset]
    transformer = base_transformer(preset)
    present = [t for t in targets if any(name.endswith(t) for name, _ in transformer.named_modules())]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=present, init_lora_weights=False))
    info = {"model": preset, "family": spec.family, "rank": rank, "alpha": alpha, "buckets": ["9x64x64"]}
    return save_lora(folder, transformer, info)


def diffusers_deltas(preset: str, lora_file: Path, scale: float = 1.0) -> dict:
    """The oracle: {weight name: fused - base}, diffusers loading the file (with its metadata) and fusing, in float64."""
    import torch

    transformer = base_transformer(preset, torch.float64)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    transformer.load_lora_adapter(str(lora_file.parent), weight_name=lora_file.name, prefix="transformer",
                                  adapter_name="oracle")
    transformer.to(torch.float64)
    transformer.fuse_lora(lora_scale=scale)
    transformer.unload_lora()
    after = transformer.state_dict()
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory):
    """`trained_lora(preset, targets)`: (file, oracle deltas), built once per session."""
    made = {}

    def build(preset: str, targets=ALL_LINEARS):
        key = (preset, targets)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"lora-{preset}")
            path = write_trained_lora(folder, preset, targets)
            made[key] = (path, diffusers_deltas(preset, path))
        return made[key]

    return build
