"""Training on every tiny family: t2v and i2v, LoRA and full, exact resume, failure handling, DDP."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cogtune.errors import ConfigError
from cogtune.models.loading import load_transformer, resolve_model
from cogtune.train import TrainConfig, run_training
from cogtune.train.config import CheckpointConfig, LoraConfig, OptimizerConfig, ValidationConfig
from cogtune.lora.format import load_lora_state, read_lora_info
from cogtune.train.lora import add_lora

FAMILIES = [("tiny", "t2v"), ("tiny-rotary", "t2v"), ("tiny-1.5", "t2v"), ("tiny-i2v", "i2v"), ("tiny-1.5-i2v", "i2v")]


def _config(model, task, cache, output, **changes):
    base = TrainConfig(task=task, model=model, data=str(cache), output_dir=str(output), steps=3,
                       lora=LoraConfig(rank=4, alpha=2), optimizer=OptimizerConfig(lr=1e-3),
                       validation=ValidationConfig(final=False))
    return dataclasses.replace(base, **changes)


def _inputs(spec, frames=3):
    generator = torch.Generator().manual_seed(3)
    channels = spec.transformer_config["in_channels"]
    frames = frames + (frames % 2 if spec.patch_size_t else 0)
    inputs = dict(hidden_states=torch.randn(1, frames, channels, 8, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 32, 32, generator=generator),
                  timestep=torch.tensor([400]), return_dict=False)
    if spec.uses_ofs:
        inputs["ofs"] = torch.tensor([2.0])
    if spec.positional_embedding == "rotary":
        from cogtune.models.positions import rotary_embeddings

        inputs["image_rotary_emb"] = rotary_embeddings(spec, frames, 8, 8)
    return inputs


@pytest.mark.parametrize(("model", "task"), FAMILIES)
def test_lora_for_each_family_loads_in_its_diffusers_pipeline(model, task, family_cache, tmp_path):
    from cogtune.models.loading import pipeline_class

    result = run_training(_config(model, task, family_cache(model), tmp_path / "run"))
    spec = resolve_model(model).spec
    assert all(torch.isfinite(torch.tensor(result.losses)))
    info = read_lora_info(result.weights)
    assert (info["family"], info["task"], info["rank"], info["alpha"]) == (spec.family, task, 4, 2.0)

    ours = load_transformer(resolve_model(model), dtype=torch.float32)
    add_lora(ours, LoraConfig(rank=4, alpha=2))
    load_lora_state(ours, result.weights)
    pipe = pipeline_class(spec).from_pretrained(resolve_model(model).location)
    pipe.load_lora_weights(result.output_dir)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**_inputs(spec))[0], ours(**_inputs(spec))[0])


@pytest.mark.parametrize(("model", "task"), FAMILIES)
def test_full_fine_tuning_for_each_family_saves_a_diffusers_transformer(model, task, family_cache, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    result = run_training(_config(model, task, family_cache(model), tmp_path / "run", full=True))
    folder = result.output_dir / "transformer"
    assert result.weights == folder and (folder / "config.json").is_file()
    trained = CogVideoXTransformer3DModel.from_pretrained(folder)
    base = load_transformer(resolve_model(model), dtype=torch.float32)
    spec = resolve_model(model).spec
    with torch.no_grad():
        assert not torch.allclose(trained(**_inputs(spec))[0], base(**_inputs(spec))[0])
    assert next(trained.parameters()).dtype == torch.float32  # tiny presets are float32 models


def test_overfitting_a_full_fine_tune_on_one_clip(family_cache, tmp_path):
    """One clip, the same noise and timestep every step (via a fixed seed per step): the loss collapses."""
    from cogtune.encode import VideoLatentCache
    from cogtune.models.loading import load_scheduler
    from cogtune.train.step import StepSettings, training_step

    model = resolve_model("tiny-1.5-i2v")
    cache = VideoLatentCache(family_cache("tiny-1.5-i2v"))
    batch = {k: v[None] for k, v in cache.load_item(0).items()}
    transformer = load_transformer(model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    scheduler = load_scheduler(model)
    losses = []
    for _ in range(80):
        loss = training_step(transformer, scheduler, model.spec, batch, cache.empty_prompt_embeds(), StepSettings(),
                             [torch.Generator().manual_seed(0)], "cpu", torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


class _Crash(Exception):
    pass


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_ten_steps_equal_five_plus_resume_plus_five(family_cache, tmp_path, monkeypatch, full):
    from cogtune.train import checkpoint

    cache = family_cache("tiny-rotary")
    common = dict(steps=10, full=full, checkpointing=CheckpointConfig(every=5, keep=2),
                  optimizer=OptimizerConfig(lr=2e-3, lr_schedule="cosine", warmup_steps=2))
    straight = run_training(_config("tiny-rotary", "t2v", cache, tmp_path / "straight", **common))

    real_save = checkpoint.save_checkpoint

    def save_then_crash(accelerator, config, step, losses, lr_scheduler_state, hooks):
        path = real_save(accelerator, config, step, losses, lr_scheduler_state, hooks)
        if step == 5:
            raise _Crash()
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        run_training(_config("tiny-rotary", "t2v", cache, tmp_path / "resumed", **common))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = run_training(_config("tiny-rotary", "t2v", cache, tmp_path / "resumed", resume="latest", **common))

    assert resumed.losses == straight.losses
    if full:
        left = load_file(next((straight.weights).glob("*.safetensors")))
        right = load_file(next((resumed.weights).glob("*.safetensors")))
    else:
        left, right = load_file(straight.weights), load_file(resumed.weights)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step-000005", "step-000010"]
    # Nothing in a checkpoint needs a full unpickler: accelerate loads its files with weights_only
    # (plus its allow-list of numpy RNG types), as here.
    from accelerate.utils import load

    for path in (tmp_path / "resumed" / "checkpoints" / "step-000005").iterdir():
        assert not path.name.startswith("custom_checkpoint")
        if path.suffix in (".bin", ".pkl"):
            load(path, weights_only=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cli, tiny_cache, tmp_path):
    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", tmp_path / "run",
                 "--steps", "6", "--lr", "1e30", "--max-grad-norm", "0", "--checkpoint-every", "1",
                 "--keep-checkpoints", "0")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: loss became nan at step") and "the last good checkpoint is" in line
    good = line.split("the last good checkpoint is ")[1].split(" ")[0].rstrip(";")
    step = int(line.split("at step ")[1].split(";")[0])
    assert good.endswith(f"step-{step - 1:06d}")
    assert not (tmp_path / "run" / "checkpoints" / f"step-{step:06d}").exists()


def test_validation_every_n_steps_and_i2v_images(family_cache, condition_image, tmp_path):
    config = _config("tiny-i2v", "i2v", family_cache("tiny-i2v"), tmp_path / "run", steps=4,
                     validation=ValidationConfig(prompts=("A red circle moves left.",), images=(str(condition_image),),
                                                 every=2, steps=2))
    result = run_training(config)
    assert (result.output_dir / "validation" / "step-000002" / "00.mp4").is_file()
    assert (result.output_dir / "validation" / "final" / "00.mp4").is_file()
    memory = json.loads((result.output_dir / "memory.json").read_text())
    assert list(memory) == ["memory_before_training", "memory_before_validation", "memory_after_validation",
                            "memory_after_testing"]


def test_i2v_validation_needs_images(family_cache, tmp_path):
    with pytest.raises(ConfigError, match="one --validation-image per prompt"):
        run_training(_config("tiny-i2v", "i2v", family_cache("tiny-i2v"), tmp_path / "run",
                             validation=ValidationConfig(prompts=("A red circle moves left.",))))


def test_other_resolutions_drop_learned_positional_embeddings(family_cache, tmp_path):
    cache = family_cache("tiny-i2v", "9x64x96")
    with pytest.raises(ConfigError, match="need them dropped"):
        run_training(_config("tiny-i2v", "i2v", cache, tmp_path / "keep", learned_positional_embeddings="keep"))
    result = run_training(_config("tiny-i2v", "i2v", cache, tmp_path / "auto"))
    assert read_lora_info(result.weights)["drop_learned_positional_embeddings"] is True
    full = run_training(_config("tiny-i2v", "i2v", cache, tmp_path / "full", full=True))
    config = json.loads((full.weights / "config.json").read_text())
    assert config["use_learned_positional_embeddings"] is False
    from diffusers import CogVideoXTransformer3DModel

    CogVideoXTransformer3DModel.from_pretrained(full.weights)  # loads without the table


def test_report_to_needs_its_package(tiny_cache, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="needs the wandb package"):
        run_training(_config("tiny", "t2v", tiny_cache, tmp_path / "run", report_to="wandb"))


def test_a_lora_trained_without_learned_positions_samples_at_its_resolution(family_cache, condition_image, tmp_path):
    from cogtune.data.video import probe_video
    from cogtune.errors import ModelError
    from cogtune.sample import SampleConfig, run_sample

    result = run_training(_config("tiny-i2v", "i2v", family_cache("tiny-i2v", "9x64x96"), tmp_path / "run"))
    sample = SampleConfig(model="tiny-i2v", prompts=("A red circle moves left.",), images=(str(condition_image),),
                          output=str(tmp_path / "wide.mp4"), frames=9, height=64, width=96, steps=2)
    with pytest.raises(ModelError, match="learned positional embeddings for 64x64 only"):
        run_sample(sample)  # the base model alone cannot
    (path,) = run_sample(dataclasses.replace(sample, lora=str(result.output_dir)))
    info = probe_video(path)
    assert (info.width, info.height, info.frames) == (96, 64, 9)


def test_a_lora_for_another_family_is_refused(family_cache, tmp_path):
    from cogtune.errors import ModelError
    from cogtune.sample import SampleConfig, run_sample

    result = run_training(_config("tiny-rotary", "t2v", family_cache("tiny-rotary"), tmp_path / "run"))
    with pytest.raises(ModelError, match=r"trained for tiny-rotary \(1.0-rotary\); tiny is 1.0-sincos"):
        run_sample(SampleConfig(model="tiny", prompts=("x",), output=str(tmp_path / "x.mp4"),
                                lora=str(result.output_dir), frames=9, height=64, width=64, steps=1))


def test_resume_from_an_unreadable_trainer_state_is_one_line(cli, tiny_cache, tmp_path):
    args = ("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", tmp_path / "run", "--rank", "4")
    assert cli(*args, "--steps", "1", "--checkpoint-every", "1").exit_code == 0
    state = tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json"
    state.write_text('{"step": 1, "losses": [0.5]}\n')  # no LR schedule state
    result = cli(*args, "--steps", "2", "--resume", "latest")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr
    assert "trainer_state.json: not a trainer state this version of cogtune can resume" in last
