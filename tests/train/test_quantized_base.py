"""Training against a quantized base (`--base-weights nf4|int8`): end to end on the tiny model.

One NF4 run (4 steps, a checkpoint every 2, the final test pass) is shared: it validates on its own
quantized transformer, resumes exactly, records its base, and its LoRA loads in diffusers on the
unquantized base, where it gives the training-time output up to the base's own quantization error.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cogtune.config import CONFIG_FILENAME, read_toml
from cogtune.errors import ConfigError
from cogtune.train import TrainConfig, run_training
from cogtune.train.config import CheckpointConfig, LoraConfig, MemoryConfig, OptimizerConfig, ValidationConfig


def _config(cache, output, **changes):
    base = TrainConfig(model="tiny", data=str(cache), output_dir=str(output), steps=4, lora=LoraConfig(rank=4),
                       optimizer=OptimizerConfig(lr=3e-3), checkpointing=CheckpointConfig(every=2, keep=0),
                       validation=ValidationConfig(final=True, steps=2), memory=MemoryConfig(base_weights="nf4"))
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def nf4_run(tiny_cache, tmp_path_factory):
    """The shared run, and the layer types of the transformer each validation pass rendered with."""
    from cogtune.train.validation import Validator

    rendered_with = []
    real_run = Validator.run

    def recording_run(self, transformer, name, memory):
        rendered_with.append({type(module).__module__ + "." + type(module).__name__ for module in transformer.modules()})
        return real_run(self, transformer, name, memory)

    Validator.run = recording_run
    try:
        result = run_training(_config(tiny_cache, tmp_path_factory.mktemp("nf4") / "run"))
    finally:
        Validator.run = real_run
    return result, rendered_with


def test_a_run_validates_on_its_quantized_transformer_and_records_its_base(nf4_run):
    from cogtune.lora.layouts import inspect_lora

    result, rendered_with = nf4_run
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert rendered_with and all("peft.tuners.lora.bnb.Linear4bit" in types and "bitsandbytes.nn.modules.Linear4bit"
                                 in types for types in rendered_with)
    assert read_toml(result.output_dir / CONFIG_FILENAME)["memory"]["base_weights"] == "nf4"
    assert "trained against an NF4 base" in (result.output_dir / "README.md").read_text()
    inspected = inspect_lora(result.output_dir)
    assert inspected["base_weights"] == "nf4" and inspected["trained_against"].startswith("trained against an NF4 base")


def test_the_nf4_runs_lora_converts_to_comfyui(nf4_run, tmp_path):
    from cogtune.lora.layouts import convert_lora, inspect_lora

    result, _ = nf4_run
    convert_lora(result.output_dir, tmp_path / "comfy.safetensors", "comfyui")
    converted = inspect_lora(tmp_path / "comfy.safetensors")
    assert converted["layout"] == "comfyui" and converted["layers"] == inspect_lora(result.output_dir)["layers"] == 8
    assert converted["trained_against"] is not None  # the header carries the base it trained against


def test_a_resumed_nf4_run_ends_as_the_uninterrupted_one(nf4_run, tiny_cache, tmp_path, monkeypatch):
    from cogtune.train import checkpoint

    straight, _ = nf4_run
    real_save = checkpoint.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(accelerator, config, step, losses, lr_scheduler_state, hooks):
        path = real_save(accelerator, config, step, losses, lr_scheduler_state, hooks)
        if step == 2:
            raise Crash()
        return path

    no_test_pass = {"validation": ValidationConfig(final=False)}  # the test pass does not touch the weights
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_training(_config(tiny_cache, tmp_path / "resumed", **no_test_pass))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = run_training(_config(tiny_cache, tmp_path / "resumed", resume="latest", **no_test_pass))
    assert resumed.losses == straight.losses
    left, right = load_file(straight.weights), load_file(resumed.weights)
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _inputs():
    generator = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(1, 32, 32, generator=generator),
                timestep=torch.tensor([400]), return_dict=False)


def test_the_lora_loads_in_diffusers_on_the_unquantized_base_within_the_quantization_error(nf4_run, tiny_cache):
    """diffusers' pipeline (the unquantized tiny base) with the LoRA, against the trainer's NF4 transformer
    with the same LoRA: they differ by about what the bases alone differ by (NF4's error)."""
    from cogtune.lora.format import load_lora_state
    from cogtune.models.loading import pipeline_class, resolve_model
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.plan import plan_run

    result, _ = nf4_run
    config = _config(tiny_cache, result.output_dir)
    trained, _ = load_trainable_transformer(config, plan_run(config), "cpu", "no")
    model = resolve_model("tiny")
    pipe = pipeline_class(model.spec).from_pretrained(model.location)
    with torch.no_grad():
        base_error = (trained(**_inputs())[0] - pipe.transformer(**_inputs())[0]).abs().max()  # LoRA B = 0 yet
        load_lora_state(trained, result.weights)
        pipe.load_lora_weights(result.output_dir)
        lora_error = (trained(**_inputs())[0] - pipe.transformer(**_inputs())[0]).abs().max()
    assert 0 < base_error and lora_error <= 1.25 * base_error, (float(lora_error), float(base_error))


def test_sampling_on_an_nf4_base_with_the_lora(nf4_run, tmp_path):
    from cogtune.data.video import probe_video
    from cogtune.sample import SampleConfig, run_sample

    result, _ = nf4_run
    (path,) = run_sample(SampleConfig(model="tiny", prompts=("A red circle moves left.",), output=str(tmp_path / "a.mp4"),
                                      steps=2, frames=9, height=64, width=64, lora=str(result.output_dir),
                                      base_weights="nf4"))
    assert probe_video(path).frames == 9


@pytest.fixture(scope="module")
def torchao_nf4_runs(tiny_cache, tmp_path_factory):
    """nf4 through torchao's NF4 tensor (`--nf4-backend torchao`): 2 steps straight, and a run resumed from the
    first one's step-1 checkpoint."""
    root = tmp_path_factory.mktemp("nf4-torchao")
    memory = MemoryConfig(base_weights="nf4", nf4_backend="torchao")
    changes = dict(steps=2, checkpointing=CheckpointConfig(every=1, keep=0), validation=ValidationConfig(final=False),
                   memory=memory)
    straight = run_training(_config(tiny_cache, root / "straight", **changes))
    resumed = run_training(_config(tiny_cache, root / "resumed", resume=str(straight.output_dir / "checkpoints" /
                                                                         "step-000001"), **changes))
    return straight, resumed


def test_torchaos_nf4_base_trains_resumes_exactly_and_is_recorded(torchao_nf4_runs, tiny_model_dir, tiny_cache, tmp_path):
    from diffusers import CogVideoXPipeline
    from torchao.quantization import NF4Tensor

    from cogtune.lora.layouts import inspect_lora
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.plan import plan_run

    straight, resumed = torchao_nf4_runs
    assert resumed.losses == straight.losses and all(torch.isfinite(torch.tensor(straight.losses)))
    left, right = load_file(straight.weights), load_file(resumed.weights)
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert read_toml(straight.output_dir / CONFIG_FILENAME)["memory"]["nf4_backend"] == "torchao"
    assert "trained against an NF4 base (torchao's NF4 tensor" in (straight.output_dir / "README.md").read_text()
    assert inspect_lora(straight.output_dir)["cogtune"]["nf4_backend"] == "torchao"
    CogVideoXPipeline.from_pretrained(tiny_model_dir).load_lora_weights(straight.output_dir)  # diffusers' layout
    config = _config(tiny_cache, tmp_path / "run", memory=MemoryConfig(base_weights="nf4", nf4_backend="torchao"))
    transformer, _ = load_trainable_transformer(config, plan_run(config), "cpu", "no")  # as the runs loaded it
    assert isinstance(transformer.transformer_blocks[0].attn1.to_q.base_layer.weight, NF4Tensor)


def test_i2v_on_an_int8_base_with_offloaded_activations(family_cache, tmp_path):
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.plan import plan_run

    config = _config(family_cache("tiny-i2v"), tmp_path / "run", task="i2v", model="tiny-i2v", steps=2,
                     checkpointing=CheckpointConfig(every=0), validation=ValidationConfig(final=False),
                     memory=MemoryConfig(base_weights="int8", offload_activations=True))
    assert all(torch.isfinite(torch.tensor(run_training(config).losses)))
    transformer, _ = load_trainable_transformer(config, plan_run(config), "cpu", "no")
    assert isinstance(transformer.transformer_blocks[0].attn1.to_q, TorchaoLoraLinear)


U = 2.0**-24


@pytest.mark.parametrize(("kind", "backend"), [("nf4", "bitsandbytes"), ("nf4", "torchao"), ("int8", "auto")])
def test_compiled_blocks_on_a_quantized_base_compute_as_eager_ones(kind, backend, tiny_cache, tmp_path):
    """`--compile` (each block through torch.compile's default backend, inductor) on bitsandbytes' NF4,
    torchao's NF4 and torchao's int8 layers with peft's LoRA on top: a block's training forward and backward,
    and its inference forward with validation's chunked feed-forward, against the same block run eagerly (its
    `forward`, which the compiled `__call__` wraps).

    Tolerance: the compiled kernels compute the same float32 operations, reassociated and fused. Reordering a
    sum of K terms moves it by at most gamma_K = K u / (1 - K u) (u = 2^-24) of its terms' magnitudes, twice
    that between two orders. To first order, and taking those magnitudes as the output's own, D chained
    contractions move the output by D * 2 * gamma_K of its largest value; the backward pass runs the chain
    again (2 D for the gradients). For a tiny block K = 128 (the feed-forward's width) and D = 8 (modulation,
    q/k/v, QK^T, AV, output, modulation, the feed-forward's two): 1.2e-4. Measured: outputs 6.7e-8, gradients
    3.5e-7 (nf4), 3.6e-7 (torchao's nf4), 4.8e-7 (int8) of their largest values.
    """
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.plan import plan_run
    from cogtune.train.validation import chunked_feed_forward

    terms, depth = 128, 8
    bound = depth * 2 * terms * U / (1 - terms * U)
    config = _config(tiny_cache, tmp_path / "run", gradient_checkpointing=False,
                     memory=MemoryConfig(base_weights=kind, nf4_backend=backend, compile=True))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    transformer, _ = load_trainable_transformer(config, plan_run(config), "cpu", "no")
    block = transformer.transformer_blocks[0]
    generator = torch.Generator().manual_seed(5)
    for name, parameter in block.named_parameters():
        if "lora_B" in name:  # non-zero, so that the LoRA's A gets a gradient and changes the output
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    inputs = (torch.randn(1, 48, 32, generator=generator), torch.randn(1, 32, 32, generator=generator),
              torch.randn(1, 16, generator=generator))
    trained = [parameter for parameter in block.parameters() if parameter.requires_grad]
    results = []
    for run in (block.forward, block):  # eager, then compiled
        output = torch.cat(run(*inputs), dim=1)
        gradients = torch.autograd.grad((output**2).mean(), trained)
        with torch.no_grad(), chunked_feed_forward(transformer, chunk_tokens=40):  # 80 tokens: 2 chunks
            inference = torch.cat(run(*inputs), dim=1)
        results.append((output.detach(), inference, gradients))
    (eager, eager_inference, eager_gradients), (ours, our_inference, our_gradients) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # training's and inference's, whole
    assert (ours - eager).abs().max() <= bound * eager.abs().max()
    assert (our_inference - eager_inference).abs().max() <= bound * eager_inference.abs().max()
    assert len(trained) == 8 and all(reference.abs().max() > 0 for reference in eager_gradients)
    for ours_, reference in zip(our_gradients, eager_gradients):
        assert (ours_ - reference).abs().max() <= 2 * bound * reference.abs().max()


@pytest.mark.parametrize(("memory", "full", "message"), [
    ({"base_weights": "nf4"}, True, "not full fine-tuning"),
    ({"base_weights": "nf4", "offload_blocks": True}, False, "memory.base_weights nf4 and memory.offload_blocks"),
])
def test_combinations_a_quantized_base_refuses(memory, full, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="tiny", data="c", output_dir="o", full=full, memory=MemoryConfig(**memory))


def _refused_before_loading(config, monkeypatch) -> str:
    """The run's one-line refusal, raised before any transformer loads."""
    import cogtune.models.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a transformer loaded")

    monkeypatch.setattr(cogtune.models.loading, "load_transformer", no_loading)
    with pytest.raises(ConfigError) as raised:
        run_training(config)
    return raised.value.message


@pytest.mark.parametrize(("kind", "backend", "found", "message"), [
    ("nf4", "auto", None, "--base-weights nf4 needs bitsandbytes, which is not installed"),
    ("nf4", "torchao", "0.10.0", "--base-weights nf4 --nf4-backend torchao needs torchao 0.16.0 or newer (found 0.10.0)"),
    ("int8", "auto", "0.10.0", "--base-weights int8 needs torchao 0.16.0 or newer (found 0.10.0)"),
])
def test_a_missing_or_old_library_is_refused_before_loading(kind, backend, found, message, tiny_cache, tmp_path,
                                                            monkeypatch):
    import importlib.metadata

    import cogtune.models.quantize

    real = importlib.metadata.version

    def version(package):
        if package != ("bitsandbytes" if (kind, backend) == ("nf4", "auto") else "torchao"):
            return real(package)
        if found is None:
            raise importlib.metadata.PackageNotFoundError(package)
        return found

    monkeypatch.setattr(cogtune.models.quantize.importlib.metadata, "version", version)
    config = _config(tiny_cache, tmp_path / "run", memory=MemoryConfig(base_weights=kind, nf4_backend=backend))
    assert _refused_before_loading(config, monkeypatch) == message


def test_nf4_on_apples_mps_takes_torchao_and_refuses_bitsandbytes_before_loading(tiny_cache, tmp_path, monkeypatch):
    import cogtune.models.loading
    import cogtune.models.quantize

    for module in (cogtune.models.quantize, cogtune.models.loading):
        monkeypatch.setattr(module, "default_device", lambda: "mps")
    assert _config(tiny_cache, tmp_path / "run").resolved().memory.nf4_backend == "torchao"  # auto, recorded so
    assert cogtune.models.quantize.nf4_backend("auto", "cpu") == cogtune.models.quantize.nf4_backend("auto", "cuda") \
        == "bitsandbytes"
    forced = _config(tiny_cache, tmp_path / "run", memory=MemoryConfig(base_weights="nf4", nf4_backend="bitsandbytes"))
    assert _refused_before_loading(forced, monkeypatch) == \
        "--nf4-backend bitsandbytes: bitsandbytes has no 4-bit kernels for mps"


def test_torchaos_nf4_with_offloaded_activations_needs_checkpointing_on_a_gpu(tiny_cache, tmp_path, monkeypatch):
    """What the refusal prevents, on the CPU: torch's pinned offloading of a saved NF4 weight fails in torchao."""
    import cogtune.train.plan
    from cogtune.models.quantize import quantize_frozen_linears

    linear = torch.nn.Linear(128, 64).requires_grad_(False)
    quantize_frozen_linears(torch.nn.Sequential(linear), "nf4", torch.float32, "cpu", "torchao")
    with pytest.raises(AttributeError), torch.autograd.graph.save_on_cpu(pin_memory=True):
        linear(torch.randn(2, 128, requires_grad=True))
    monkeypatch.setattr(cogtune.train.plan, "default_device", lambda: "cuda")
    config = _config(tiny_cache, tmp_path / "run", gradient_checkpointing=False,
                     memory=MemoryConfig(base_weights="nf4", nf4_backend="torchao", offload_activations=True))
    assert "--offload-activations without gradient checkpointing cannot offload torchao's NF4 weights" in \
        _refused_before_loading(config, monkeypatch)


def test_an_already_quantized_model_folder_is_refused_before_loading(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    transformer_config = folder / "transformer" / "config.json"
    saved = json.loads(transformer_config.read_text())
    transformer_config.write_text(json.dumps({**saved, "quantization_config": {"quant_method": "bitsandbytes"}}))
    config = _config(tiny_cache, tmp_path / "run", model=str(folder))
    assert "transformer is quantized already (by bitsandbytes)" in _refused_before_loading(config, monkeypatch)


def test_fp8_is_a_shorthand_that_cannot_contradict_base_weights(cli, tiny_cache, tmp_path):
    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", tmp_path / "run",
                 "--fp8", "--base-weights", "nf4")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1
    assert "--fp8 means --base-weights fp8; it contradicts --base-weights nf4" in lines[0]


def test_bench_sizes_each_base_and_the_ladder_proposes_nf4(cli, tmp_path):
    from cogtune.train.sizing.fit import ladder

    result = cli("bench", "memory", "--model", "tiny", "--shape", "9x64x64", "--no-validation",
                 "--base-weights", "bf16,fp8,int8,nf4", "--json", tmp_path / "rows.json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [row["case"]["base_weights"] for row in rows] == ["bf16", "fp8", "int8", "nf4"]
    assert all(f", {kind}," in row["label"] for row, kind in zip(rows[1:], ("fp8", "int8", "nf4")))

    config = TrainConfig(model="cogvideox-5b", data="<bench>", output_dir="<bench>", random_weights=True,
                         gradient_checkpointing=False)
    rungs = [(c.memory.base_weights, c.memory.offload_activations, c.memory.offload_blocks) for c in ladder(config)]
    # after activation offloading, before block offloading (which a quantized base excludes)
    assert rungs.index(("nf4", True, False)) == rungs.index(("fp8", True, False)) + 1
    assert rungs.index(("nf4", True, False)) < rungs.index(("bf16", True, True))
