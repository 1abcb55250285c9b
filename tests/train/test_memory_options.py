"""Memory and speed options on the CPU: every optimizer, fp8 storage, offloading, compile."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from cogtune.errors import ConfigError
from cogtune.models.loading import resolve_model
from cogtune.train import TrainConfig, run_training
from cogtune.train.config import LoraConfig, MemoryConfig, OptimizerConfig, ValidationConfig
from cogtune.train.optimizers import clip_gradients, keep_tensor_learning_rates, remember_tensor_learning_rates


def _config(cache, output, **changes):
    base = TrainConfig(model="tiny", data=str(cache), output_dir=str(output), steps=4, lora=LoraConfig(rank=4),
                       optimizer=OptimizerConfig(lr=1e-3, lr_schedule="linear"), validation=ValidationConfig(final=False))
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("name", ["adamw", "adam", "adamw-8bit", "adamw-8bit-paged", "adamw-8bit-ao", "adamw-4bit-ao",
                                  "prodigy"])
def test_each_optimizer_trains_and_follows_the_schedule(name, tiny_cache, tmp_path):
    lr = 1.0 if name == "prodigy" else 1e-3
    config = _config(tiny_cache, tmp_path / "run", optimizer=OptimizerConfig(name=name, lr=lr, lr_schedule="linear"))
    result = run_training(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    summary = json.loads((result.output_dir / "training_summary.json").read_text())
    # linear decay over 4 steps, read back from the optimizer after each schedule step
    assert summary["learning_rates"] == pytest.approx([lr * 3 / 4, lr * 2 / 4, lr * 1 / 4, 0.0], abs=1e-9)
    from safetensors.torch import load_file

    assert any(v.abs().sum() > 0 for k, v in load_file(result.weights).items() if "lora_B" in k)


def test_cpu_offload_optimizer_needs_a_gpu(tiny_cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="adamw-cpu-offload needs a CUDA GPU"):
        run_training(_config(tiny_cache, tmp_path / "run", optimizer=OptimizerConfig(name="adamw-cpu-offload")))


@pytest.mark.gpu
def test_cpu_offload_optimizer_on_a_gpu(tiny_cache, tmp_path):
    config = _config(tiny_cache, tmp_path / "run",
                     optimizer=OptimizerConfig(name="adamw-cpu-offload", lr=1e-3, lr_schedule="linear", max_grad_norm=0.1))
    result = run_training(config)
    summary = json.loads((result.output_dir / "training_summary.json").read_text())
    assert summary["learning_rates"] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_tensor_learning_rates_survive_a_schedule_that_writes_floats():
    learning_rate = torch.tensor(0.1)
    optimizer = SimpleNamespace(param_groups=[{"lr": learning_rate}])
    originals = remember_tensor_learning_rates(optimizer)
    optimizer.param_groups[0]["lr"] = 0.05  # what an LR schedule of older torch versions does
    keep_tensor_learning_rates(optimizer, originals)
    assert optimizer.param_groups[0]["lr"] is learning_rate and float(learning_rate) == pytest.approx(0.05)


def test_clipping_reaches_offloaded_gradients():
    """With CPUOffloadOptimizer, gradients live on the host copies; clipping must scale those."""

    class Event:
        def synchronize(self):
            pass

    device_params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    hosts = [torch.zeros(3), torch.zeros(4)]
    hosts[0].grad, hosts[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    retained = torch.nn.Parameter(torch.zeros(2))
    retained.grad = torch.tensor([0.0, 5.0])
    inner = SimpleNamespace(param_d2h_map=dict(zip(device_params, hosts)), queue={p: Event() for p in device_params},
                            d_param_groups=[{"params": [retained]}])
    clip_gradients(None, SimpleNamespace(optimizer=inner), device_params, max_norm=1.0)
    total = torch.linalg.vector_norm(torch.cat([hosts[0].grad, hosts[1].grad, retained.grad]))
    assert float(total) == pytest.approx(1.0, rel=1e-4)


def _trainable(config):
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.plan import plan_run

    return load_trainable_transformer(config, plan_run(config), "cpu", "no")[0]


def test_fp8_storage_keeps_lora_and_norms_in_full_precision(tiny_cache, tmp_path):
    transformer = _trainable(_config(tiny_cache, tmp_path / "run", memory=MemoryConfig(base_weights="fp8")))
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.ff.net.2.weight"] == torch.float8_e4m3fn
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if "lora_" in name or "norm" in name)


def test_fp8_training_gives_a_lora_that_loads_in_diffusers(tiny_cache, tiny_model_dir, tmp_path):
    from diffusers import CogVideoXPipeline

    result = run_training(_config(tiny_cache, tmp_path / "run", memory=MemoryConfig(base_weights="fp8")))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(result.output_dir)


@pytest.mark.parametrize("memory", [MemoryConfig(offload_blocks=True), MemoryConfig(offload_activations=True)],
                         ids=["blocks", "activations"])
def test_offloading_does_not_change_the_result(memory, tiny_cache, tmp_path):
    from safetensors.torch import load_file

    plain = run_training(_config(tiny_cache, tmp_path / "plain"))
    offloaded = run_training(_config(tiny_cache, tmp_path / "offloaded", memory=memory))
    assert offloaded.losses == plain.losses
    left, right = load_file(plain.weights), load_file(offloaded.weights)
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_fsdp_activation_checkpointing_turns_the_models_own_off(tiny_cache, tmp_path):
    """Where the launch's FSDP config checkpoints the blocks, the model's own would recompute them twice."""
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.placement import memory_placement
    from cogtune.train.plan import plan_run

    config = _config(tiny_cache, tmp_path / "run")
    assert memory_placement(config).checkpoint_blocks
    assert not memory_placement(config, fsdp_checkpoints_activations=True).checkpoint_blocks
    assert not memory_placement(dataclasses.replace(config, gradient_checkpointing=False)).checkpoint_blocks
    assert _trainable(config).is_gradient_checkpointing
    transformer, _ = load_trainable_transformer(config, plan_run(config), "cpu", "no", fsdp_checkpoints_activations=True)
    assert not transformer.is_gradient_checkpointing


def test_memory_option_rules():
    with pytest.raises(ConfigError, match="not full fine-tuning"):
        TrainConfig(model="tiny", data="c", output_dir="o", full=True, memory=MemoryConfig(base_weights="fp8"))
    with pytest.raises(ConfigError, match="needs gradient checkpointing"):
        TrainConfig(model="tiny", data="c", output_dir="o", gradient_checkpointing=False,
                    memory=MemoryConfig(offload_blocks=True))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_blocks_compile_without_graph_breaks(family_cache, tmp_path, fp8):
    import torch._dynamo as dynamo

    from cogtune.models.positions import rotary_embeddings

    config = _config(family_cache("tiny-rotary"), tmp_path / "run", model="tiny-rotary",
                     memory=MemoryConfig(base_weights="fp8" if fp8 else "bf16"))
    transformer = _trainable(config)
    rotary = rotary_embeddings(resolve_model("tiny-rotary").spec, 3, 8, 8)
    dynamo.reset()
    explanation = dynamo.explain(transformer.transformer_blocks[0])(
        torch.randn(1, 48, 32), torch.randn(1, 32, 32), torch.randn(1, 16), rotary)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_sincos_positions_at_another_resolution_compile_without_graph_breaks():
    """The seed's compiled run broke on the sincos table recomputed for a non-default size."""
    import torch._dynamo as dynamo

    from cogtune.models.loading import load_transformer

    transformer = load_transformer(resolve_model("tiny"), dtype=torch.float32)
    dynamo.reset()
    explanation = dynamo.explain(transformer)(
        hidden_states=torch.randn(1, 3, 4, 8, 12), encoder_hidden_states=torch.randn(1, 32, 32),
        timestep=torch.tensor([10]), return_dict=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_cache, tmp_path):
    eager = run_training(_config(tiny_cache, tmp_path / "eager", steps=2))
    compiled = run_training(_config(tiny_cache, tmp_path / "compiled", steps=2, memory=MemoryConfig(compile=True)))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)


@pytest.mark.slow
def test_fp8_weights_work_with_data_parallelism(tiny_cache, tmp_path):
    """finetrainers #316: fp8 storage broke DDP. Frozen weights are left out of DDP's synchronisation.
    (2 processes forked as `accelerate launch` starts them: tests/distributed/forked.py.)"""
    from tests.distributed.conftest import write_accelerate_config
    from tests.distributed.forked import forked_launch

    log = forked_launch(write_accelerate_config(tmp_path, "ddp", gpus=2), "train", "t2v", "--model", "tiny", "--data",
                        tiny_cache, "--output-dir", tmp_path / "run", "--steps", "2", "--rank", "4", "--fp8",
                        log=tmp_path / "launch.log").finish()
    assert "DDP" in log and "fp8" in log
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("tile", ["192x288", "160x240", "0x40", "192", "axb"])
def test_validation_tile_must_be_a_size_where_diffusers_tiles_meet(tile):
    """Heights in 48s, widths in 40s: diffusers' tiles overlap by 1/6 and 1/5 in whole latents (the decode
    test in tests/test_sample.py shows the sizes other tiles give)."""
    with pytest.raises(ConfigError, match="validation_vae_tile must be HxW pixels, H a multiple of 48 and W of 40"):
        MemoryConfig(validation_vae_tile=tile)
    assert MemoryConfig(validation_vae_tile=" 192 x 240 ").validation_tile_size == (192, 240)


def test_validation_decodes_in_the_configured_tiles(tiny_cache, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLCogVideoX

    calls = []
    real = AutoencoderKLCogVideoX.enable_tiling

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKLCogVideoX, "enable_tiling", spy)
    config = _config(tiny_cache, tmp_path / "run", steps=1, memory=MemoryConfig(validation_vae_tile="48x80"),
                     validation=ValidationConfig(prompts=("A red circle moves left.",), steps=1))
    result = run_training(config)
    assert calls == [{"tile_sample_min_height": 48, "tile_sample_min_width": 80}]
    assert (result.output_dir / "validation" / "final" / "00.mp4").is_file()


def test_chunked_feed_forward_gives_the_same_output_and_leaves_no_trace(tiny_cache, tmp_path):
    from cogtune.train.validation import chunked_feed_forward

    transformer = _trainable(_config(tiny_cache, tmp_path / "run")).eval()
    block = transformer.transformer_blocks[0]
    hidden = torch.randn(2, 37, block.ff.net[0].proj.in_features)
    calls = []
    hook = block.ff.net[0].register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    with torch.no_grad():
        whole = block.ff(hidden)
        with chunked_feed_forward(transformer, chunk_tokens=16):
            chunked = block.ff(hidden)
        after = block.ff(hidden)
    hook.remove()
    assert calls == [37, 16, 16, 5, 37]  # chunked inside the context only
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, whole) and "forward" not in block.ff.__dict__
