"""`--report-to tensorboard`: read back with TensorBoard's own event reader, and the model card.

TensorBoard's `EventAccumulator` is the oracle: what it reads is what the TensorBoard UI shows.
"""

from __future__ import annotations

import importlib.util
import io
import json

import pytest

STEP_TAGS = ("loss", "lr", "grad_norm", "step_seconds")


@pytest.fixture(scope="module")
def tensorboard_run(tiny_cache, tmp_path_factory):
    """A 3-step tiny run logging to TensorBoard, validating after step 2 and at the end."""
    from cogtune.cli.app import main

    output = tmp_path_factory.mktemp("tb") / "run"
    args = ["train", "t2v", "--model", "tiny", "--data", str(tiny_cache), "--output-dir", str(output), "--steps", "3",
            "--rank", "4", "--checkpoint-every", "0", "--report-to", "tensorboard", "--validation-every", "2",
            "--validation-steps", "2"]
    capture = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(capture):
        try:
            main(args)
        except SystemExit as exc:
            assert exc.code in (0, None), capture.getvalue()
    return output, capture.getvalue()


def _events(output):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "logs" / "cogtune"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_every_step_logs_loss_lr_grad_norm_and_seconds(tensorboard_run):
    output, _ = tensorboard_run
    events = _events(output)
    summary = json.loads((output / "training_summary.json").read_text())

    for tag in STEP_TAGS:
        assert [event.step for event in events.Scalars(tag)] == [1, 2, 3], tag
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(summary["losses"], rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(summary["learning_rates"], rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("grad_norm"))
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("memory/")]  # a CPU run: no fake zeros


def test_each_validation_pass_logs_its_video_as_an_animated_image(tensorboard_run):
    from PIL import Image

    output, _ = tensorboard_run
    images = _events(output).Images("validation/00")

    assert [image.step for image in images] == [2, 3]  # after step 2, and the final pass
    for image in images:
        gif = Image.open(io.BytesIO(image.encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (64, 64)
    assert (output / "validation" / "step-000002" / "00.mp4").is_file()


def test_each_evaluation_logs_the_loras_effect(tensorboard_run):
    """Evaluated at each validation (step 2) and at the end; with no held-out items, the effect and no loss."""
    output, _ = tensorboard_run
    events = _events(output)
    rows = json.loads((output / "evaluation.json").read_text())["evaluations"]
    assert [event.step for event in events.Scalars("eval/lora_effect")] == [row["step"] for row in rows] == [2, 3]
    assert [event.value for event in events.Scalars("eval/lora_effect")] == pytest.approx(
        [row["effect"] for row in rows], rel=1e-6)
    assert [event.step for event in events.Scalars("eval/seconds")] == [2, 3]
    assert "eval/heldout_loss" not in events.Tags()["scalars"]


def test_the_end_of_the_run_says_where_the_logs_are(tensorboard_run):
    output, stderr = tensorboard_run
    assert f"tensorboard --logdir {output / 'logs'}" in " ".join(stderr.split())


def test_the_run_folder_gets_a_model_card(tensorboard_run):
    from huggingface_hub import ModelCard

    output, _ = tensorboard_run
    card = ModelCard.load(output / "README.md")

    assert card.data.base_model == "tiny" and card.data.library_name == "diffusers"
    assert {"text-to-video", "lora", "cogvideox", "cogtune"} <= set(card.data.tags)
    assert "![validation video](model_card.gif)" in card.text
    assert (output / "model_card.gif").is_file()
    assert "LoRA rank 4, alpha 4" in card.text
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "snippet", "exec")
    assert "CogVideoXPipeline.from_pretrained" in code and f'load_lora_weights("{output}"' in code


def test_a_missing_tracker_package_names_the_extra(cli, tiny_cache, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", tmp_path / "run",
                 "--report-to", "wandb")
    assert result.exit_code == 1
    assert "needs the wandb package" in result.stderr and "pip install 'cogtune[wandb]'" in result.stderr


def test_the_model_card_snippet_loads_the_lora_in_diffusers_at_its_trained_strength(tensorboard_run):
    """The card's own code, run on the CPU against the tiny base: its adapter at scale 1.0 gives what
    a plain `load_lora_weights` gives (test_training checks that equals the trained transformer)."""
    import torch
    from huggingface_hub import ModelCard

    from cogtune.models.loading import pipeline_class, resolve_model
    from tests.train.test_training import _inputs

    output, _ = tensorboard_run
    model = resolve_model("tiny")
    code = ModelCard.load(output / "README.md").text.split("```python\n", 1)[1].split("```", 1)[0]
    setup = code.split("\nvideo = ", 1)[0].replace('.to("cuda")', "").replace('"tiny"', repr(model.location))
    scope: dict = {}
    exec(setup, scope)
    pipe = scope["pipe"]
    assert type(pipe) is pipeline_class(model.spec) and pipe.get_active_adapters() == ["cogtune"]

    plain = pipeline_class(model.spec).from_pretrained(model.location)
    plain.load_lora_weights(output)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**_inputs(model.spec))[0], plain.transformer(**_inputs(model.spec))[0])
        base = pipeline_class(model.spec).from_pretrained(model.location).transformer(**_inputs(model.spec))[0]
    assert not torch.allclose(base, plain.transformer(**_inputs(model.spec))[0])  # the LoRA does act


def test_wandb_offline_run_gets_the_validation_videos(cli, tiny_cache, tmp_path, monkeypatch):
    """Same code path with wandb (not in the test extra: skipped unless installed), offline."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"

    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", output, "--steps", "3",
                 "--rank", "4", "--checkpoint-every", "0", "--report-to", "wandb", "--validation-every", "2",
                 "--validation-steps", "2")

    assert result.exit_code == 0, result.stderr
    (run,) = (output / "logs" / "wandb").glob("offline-run-*")
    videos = sorted(path.name.split("_")[1] for path in run.glob("files/media/videos/validation/00_*.mp4"))
    assert videos == ["2", "3"]  # wandb names logged media after the step
    assert f"wandb offline run: {run}" in " ".join(result.stderr.split())


def test_a_local_base_model_is_named_in_the_card_but_not_as_hub_metadata(tiny_model_dir, tiny_cache, tmp_path):
    """The Hub checks `base_model` against its repos, so a local folder there would make a push fail."""
    from huggingface_hub import ModelCard

    from cogtune.train import TrainConfig
    from cogtune.train.model_card import model_card
    from cogtune.train.plan import plan_run

    config = TrainConfig(model=str(tiny_model_dir), data=str(tiny_cache), output_dir=str(tmp_path / "run"))
    card = ModelCard(model_card(config, plan_run(config)))
    assert card.data.base_model is None and "cogtune" in card.data.tags
    assert f"`{tiny_model_dir}`" in card.text
