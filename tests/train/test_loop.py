"""LoRA training on the tiny model: it learns, it saves what diffusers loads, at the trained scale."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cogtune.models.loading import load_transformer, resolve_model
from cogtune.train import TrainConfig, run_training
from cogtune.train.config import LoraConfig, OptimizerConfig, ValidationConfig
from cogtune.lora.format import load_lora_state
from cogtune.train.lora import add_lora


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_cache):
    output = tmp_path_factory.mktemp("run") / "lora"
    config = TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(output), steps=12,
                         lora=LoraConfig(rank=8, alpha=4), optimizer=OptimizerConfig(lr=5e-3),
                         validation=ValidationConfig(steps=2))
    return run_training(config), config


def test_run_writes_its_outputs(lora_run):
    result, config = lora_run
    out = result.output_dir
    for name in ("pytorch_lora_weights.safetensors", "config.toml", "memory.json", "loss.png",
                 "training_summary.json"):
        assert (out / name).is_file(), name
    memory = json.loads((out / "memory.json").read_text())
    assert set(memory) == {"memory_before_training", "memory_before_validation", "memory_after_validation",
                           "memory_after_testing"}
    assert (out / "validation" / "final" / "00.mp4").is_file()
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not list(out.glob(".tmp-*"))


def test_lora_loads_in_diffusers_without_unexpected_keys(lora_run, tiny_model_dir, caplog):
    from diffusers import CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    result, _ = lora_run
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(result.output_dir)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    with safe_open(str(result.weights), "pt") as handle:
        saved = {k.removeprefix("transformer.") for k in handle.keys()}
    loaded = {k.replace(".default_0", "") for k in get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")}
    assert saved == loaded


def test_diffusers_reproduces_the_trained_transformer(lora_run, tiny_model_dir):
    """Loaded with plain `load_lora_weights` (no set_adapters), the LoRA acts at the trained alpha/rank."""
    from diffusers import CogVideoXPipeline

    result, config = lora_run
    ours = load_transformer(resolve_model("tiny"), dtype=torch.float32)
    add_lora(ours, config.lora)
    load_lora_state(ours, result.weights)
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(result.output_dir)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 32, 32, generator=generator),
                  timestep=torch.tensor([500]), return_dict=False)
    with torch.no_grad():
        expected = ours(**inputs)[0]
        actual = pipe.transformer(**inputs)[0]
        base = load_transformer(resolve_model("tiny"), dtype=torch.float32)(**inputs)[0]
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(actual, base)  # the LoRA does something


def test_overfitting_one_clip_drives_the_loss_down(tmp_path, tiny_cache):
    """Same clip, same noise and timestep every step: the model must fit it."""
    from cogtune.encode import VideoLatentCache
    from cogtune.models.loading import load_scheduler
    from cogtune.train.step import StepSettings, training_step

    model = resolve_model("tiny")
    cache = VideoLatentCache(tiny_cache)
    batch = {k: v[None] for k, v in cache.load_item(0).items()}
    transformer = load_transformer(model, dtype=torch.float32)
    transformer.requires_grad_(False)
    add_lora(transformer, LoraConfig(rank=16, target_modules=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2", "proj_out")))
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=3e-3)
    scheduler = load_scheduler(model)
    losses = []
    for _ in range(100):
        generators = [torch.Generator().manual_seed(0)]
        loss = training_step(transformer, scheduler, model.spec, batch, cache.empty_prompt_embeds(), StepSettings(),
                             generators, "cpu", torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_task_must_match_the_model(tmp_path, tiny_cache):
    from cogtune.errors import ConfigError

    with pytest.raises(ConfigError, match="text-to-video model; use `cogtune train t2v`"):
        run_training(TrainConfig(task="i2v", model="tiny", data=str(tiny_cache), output_dir=str(tmp_path)))
