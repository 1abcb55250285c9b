"""What the LoRA learned: held-out items stay out of training (resume included), the held-out loss is
recorded, plotted and carded, and a LoRA that does nothing is warned about (a healthy one is not)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import cogtune.train.data as train_data
from cogtune.errors import ConfigError
from cogtune.train import TrainConfig, run_training
from cogtune.train.config import CheckpointConfig, EvaluationConfig, LoraConfig, OptimizerConfig, ValidationConfig

NO_EFFECT = "warning: the LoRA has almost no effect"


def _config(cache, output, **changes) -> TrainConfig:
    base = TrainConfig(model="tiny", data=str(cache), output_dir=str(output), steps=4,
                       lora=LoraConfig(rank=4, alpha=4), optimizer=OptimizerConfig(lr=1e-3),
                       validation=ValidationConfig(final=False), checkpointing=CheckpointConfig(every=2))
    return dataclasses.replace(base, **changes)


@pytest.fixture
def trained_batches(monkeypatch):
    """Every item index the training loop loads (its batch loader's calls, prefetches included)."""
    loaded: list[int] = []
    load = train_data.load_batch

    def recording(cache, indices):
        loaded.extend(indices)
        return load(cache, indices)

    monkeypatch.setattr(train_data, "load_batch", recording)
    return loaded


def test_held_out_items_stay_out_of_training_across_a_resume(tiny_cache, tmp_path, trained_batches, capsys):
    from cogtune.encode.cache import VideoLatentCache

    evaluation = EvaluationConfig(split=0.5, every=1, keep_best=True)
    first = _config(tiny_cache, tmp_path / "run", evaluation=evaluation)
    run_training(first)
    run = tmp_path / "run"
    record = json.loads((run / "heldout_items.json").read_text())
    ids = [item["id"] for item in record["items"]]
    cache = VideoLatentCache(tiny_cache)
    held = {index for index, item in enumerate(cache.items) if item["latent_file"] in ids}
    assert record["split"] == 0.5 and len(held) == 2  # 4 items, half held out
    first_session = list(trained_batches)
    assert first_session and not held & set(first_session)

    with pytest.raises(ConfigError, match="trained with --eval-split 0.5, this resume asks for no held-out items"):
        run_training(dataclasses.replace(first, steps=6, resume="latest", evaluation=EvaluationConfig()))
    run_training(dataclasses.replace(first, steps=6, resume="latest"))
    assert json.loads((run / "heldout_items.json").read_text())["items"] == record["items"]
    resumed = trained_batches[len(first_session):]
    assert resumed and not held & set(resumed)
    assert set(first_session) | set(resumed) == set(range(len(cache))) - held  # the rest all trained

    evaluations = json.loads((run / "evaluation.json").read_text())["evaluations"]
    assert [row["step"] for row in evaluations] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run / "training_summary.json").read_text())["evaluation"]
    best = min(evaluations, key=lambda row: row["loss"])
    assert (summary["best_step"], summary["last_step"]) == (best["step"], 6)
    assert json.loads((run / "best" / "best.json").read_text()) == {"step": best["step"]}
    assert (run / "best" / "pytorch_lora_weights.safetensors").is_file()
    card = (run / "README.md").read_text()
    assert "## Held-out loss" in card and "| training items | 2 (2 more held out) |" in card
    # A healthy LoRA (lr 1e-3, the scale alpha / rank = 1) changes the predictions measurably: no warning.
    assert all(row["effect"] > 1e-4 for row in evaluations)
    assert NO_EFFECT not in capsys.readouterr().err


def test_a_lora_that_learns_nothing_reports_no_effect_and_warns_once(tiny_cache, tmp_path, capsys):
    """lr 0 leaves B at its initial zeros: the LoRA's output is exactly the base's, at every evaluation."""
    run_training(_config(tiny_cache, tmp_path / "run", steps=3, optimizer=OptimizerConfig(lr=0.0),
                         checkpointing=CheckpointConfig(every=0),
                         evaluation=EvaluationConfig(split=0.25, every=1)))
    evaluations = json.loads((tmp_path / "run" / "evaluation.json").read_text())["evaluations"]
    assert [row["effect"] for row in evaluations] == [0.0, 0.0, 0.0]
    assert all(row["loss"] == row["base_loss"] for row in evaluations)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith(NO_EFFECT)]
    assert len(warnings) == 1
    assert all(cause in warnings[0] for cause in ("--lr", "--lora-alpha", "--lora-target", "--steps"))


def test_an_eval_split_that_leaves_nothing_to_train_is_refused(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="leaving none to train on"):
        run_training(_config(tiny_cache, tmp_path / "run", evaluation=EvaluationConfig(split=0.9)))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_eval_data_holding_training_items_is_refused(tiny_cache, tmp_path):
    """The training cache itself as --eval-data (or any cache with the same latents): nothing would be held out."""
    with pytest.raises(ConfigError, match=r"holds \d+ clips that --data .* trains on too"):
        run_training(_config(tiny_cache, tmp_path / "run", evaluation=EvaluationConfig(data=str(tiny_cache))))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_overfitting_is_warned_once_naming_the_best_step(capsys):
    """The held-out loss rising for `overfit_evaluations` evaluations while the training loss falls."""
    from cogtune.train.evaluation import Evaluation, EvaluationLog

    config = TrainConfig(model="tiny", data="cache", output_dir="run", steps=100,
                         evaluation=EvaluationConfig(split=0.1, overfit_evaluations=2))
    log = EvaluationLog(config)

    def add(step, loss, train_loss):
        return log.add(Evaluation(step=step, loss=loss, base_loss=0.6, effect=0.01, seconds=0.1,
                                  train_loss=train_loss))

    assert add(10, 0.50, 0.9) and add(20, 0.40, 0.8)  # each the best so far
    assert not add(30, 0.45, 0.7)
    assert "overfitting" not in capsys.readouterr().err  # one rise is not yet a trend
    add(40, 0.47, 0.6)
    add(50, 0.49, 0.5)
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "overfitting" in line]
    assert "the best held-out loss so far is 0.4 at step 20" in warning
    assert log.summary()["best_step"] == 20 and log.summary()["last_step"] == 50

    rising_together = EvaluationLog(config)  # both losses rise: no sign of overfitting
    for step, loss in ((10, 0.4), (20, 0.45), (30, 0.5)):
        rising_together.add(Evaluation(step=step, loss=loss, base_loss=None, effect=None, seconds=0.1,
                                       train_loss=loss + 0.5))
    assert "overfitting" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_clips_cache(run_once, cogtune_home):
    """A `tiny` cache of 2 clips that are not the training cache's (other files, another framing)."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.data.synthetic import make_synthetic_dataset
    from cogtune.encode import EncodeConfig, encode_dataset

    def build(root: Path) -> None:
        data = make_synthetic_dataset(root / "data", count=2, frames=9, height=64, width=96)
        encode_dataset(EncodeConfig(model="tiny", output_dir=str(root / "cache"), data=DatasetConfig(root=str(data)),
                                    buckets=("9x64x64",), num_workers=0))

    return run_once("tiny-other-clips", build) / "cache"


def test_eval_data_scores_another_cache_and_trains_on_all_of_data(tiny_cache, other_clips_cache, family_cache,
                                                                   tmp_path, trained_batches):
    from cogtune.encode.cache import VideoLatentCache

    same_clips = family_cache("tiny", "9x64x96")  # the training clips at another size: not held out
    with pytest.raises(ConfigError, match=r"holds \d+ clips that --data .* trains on too"):
        run_training(_config(tiny_cache, tmp_path / "refused", evaluation=EvaluationConfig(data=str(same_clips))))
    other = other_clips_cache
    run_training(_config(tiny_cache, tmp_path / "run", steps=4, checkpointing=CheckpointConfig(every=0),
                         evaluation=EvaluationConfig(data=str(other), every=2)))
    record = json.loads((tmp_path / "run" / "heldout_items.json").read_text())
    assert record["data"] == str(other) and record["cache"] == str(other)
    assert [item["id"] for item in record["items"]] == [item["latent_file"] for item in VideoLatentCache(other).items]
    assert set(trained_batches) == set(range(len(VideoLatentCache(tiny_cache))))  # nothing of --data held out
    evaluations = json.loads((tmp_path / "run" / "evaluation.json").read_text())["evaluations"]
    assert [row["step"] for row in evaluations] == [2, 4] and all(row["loss"] > 0 for row in evaluations)
