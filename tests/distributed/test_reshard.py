"""A checkpoint written by N processes resumes on M, with the same global batch, as if never stopped.

2 processes x batch 1 and 1 process x batch 2 (both with 2 accumulation micro-steps) train the
same samples with the same random draws, so a run that switches between them at its step-2
checkpoint must end where the uninterrupted run ends, within the tolerance of
`test_training.py` (float32 sums in another order). DDP checkpoints hold the whole optimizer;
FSDP2 ones hold its shards (torch.distributed.checkpoint): under FSDP on another number of
processes torch reshards them (2 x batch 3 -> 3 x batch 2); without FSDP (one process, DDP)
cogtune reads them back into a whole optimizer. A checkpoint written without FSDP resumes under
FSDP: its whole optimizer and trainable weights are broadcast into the shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.conftest import write_accelerate_config
from tests.distributed.forked import forked_launch
from tests.distributed.test_training import TOLERANCE, Run, _in_process, _max_difference
from tests.distributed.test_training import training_runs  # noqa: F401 (a fixture: the runs resumed here)

ARGS = ("--model", "tiny", "--steps", "4", "--rank", "4", "--lr", "1e-3", "--lr-schedule", "cosine",
        "--warmup-steps", "1", "--gradient-accumulation", "2", "--checkpoint-every", "2", "--keep-checkpoints", "0",
        "--no-validation-final")


# The uninterrupted runs test_training.py trains too (with validation, which reseeds nothing: every
# micro-step seeds its own draws; its FSDP full fine-tune lets FSDP checkpoint the activations, which
# changes no saved state), by name here: (strategy, method) there.
TRAINED_THERE = {"ddp": ("ddp", "lora"), "fsdp": ("fsdp", "lora"), "one": ("one", "lora"), "one-full": ("one", "full"),
                 "fsdp-full": ("fsdp", "full")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, three_prompt_cache, training_runs):
    """Runs by name, each made once per module: a strategy is 2 launched processes x batch 1, `None` one process
    x batch 2 (in this process), unless `extra` gives `--batch-size`."""
    root = tmp_path_factory.mktemp("reshard")
    made: dict[str, Run] = {}

    def get(name: str, strategy: str | None, resume: Path | None = None, *extra: str) -> Run:
        if name in TRAINED_THERE:
            return training_runs(*TRAINED_THERE[name])
        if name in made:
            return made[name]
        output = root / name
        args = ["train", "t2v", *ARGS, *extra, "--data", three_prompt_cache, "--output-dir", output]
        if resume is not None:
            args += ["--resume", resume]
        if strategy is None:
            log = _in_process(*args, *(() if "--batch-size" in extra else ("--batch-size", "2")))
        else:
            config = write_accelerate_config(root, strategy, gpus=2)
            log = forked_launch(config, *args, *(() if "--batch-size" in extra else ("--batch-size", "1")),
                                log=root / f"{name}.log").finish()
        made[name] = Run(output, log)
        return made[name]

    return get


def _step_2(run: Run) -> Path:
    return run.output_dir / "checkpoints" / "step-000002"


def _assert_same_run(resumed: Run, straight: Run, method: str = "lora") -> None:
    assert _max_difference(resumed.weights, straight.weights) <= TOLERANCE[method]
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)


@pytest.mark.slow
def test_trainer_state_records_the_processes_and_the_global_batch(runs):
    state = json.loads((_step_2(runs("ddp", "ddp")) / "trainer_state.json").read_text())
    assert state["processes"] == 2
    assert state["global_batch"] == {"per_process": 1, "processes": 2, "accumulation": 2}


@pytest.mark.slow
def test_ddp_checkpoint_of_two_processes_resumes_on_one(runs):
    straight = runs("ddp", "ddp")
    resumed = runs("ddp-to-one", None, _step_2(straight))
    _assert_same_run(resumed, straight)


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_two_under_ddp(runs):
    straight = runs("one", None)
    resumed = runs("one-to-ddp", "ddp", _step_2(straight))
    assert "resumed from" in resumed.log and "at step 2" in resumed.log
    assert "resuming on 2 process(es) a checkpoint of 1: the same global batch" in " ".join(resumed.log.split())
    _assert_same_run(resumed, straight)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_checkpoint_of_two_processes_resumes_on_one(runs, method):
    """The optimizer's FSDP2 shards (torch.distributed.checkpoint) become one process's whole optimizer."""
    extra = ("--full",) if method == "full" else ()
    straight = runs(f"fsdp-{method}" if extra else "fsdp", "fsdp", None, *extra)
    assert (_step_2(straight) / "optimizer_0").is_dir()
    resumed = runs(f"fsdp-{method}-to-one", None, _step_2(straight), *extra)
    _assert_same_run(resumed, straight, method)


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_processes_resumes_under_ddp(runs):
    straight = runs("fsdp", "fsdp")
    resumed = runs("fsdp-to-ddp", "ddp", _step_2(straight))
    _assert_same_run(resumed, straight)


def test_another_global_batch_is_said_in_one_warning(runs, cli, three_prompt_cache, tmp_path):
    """1 process x batch 1 from a checkpoint of 1 x 2: the run continues, and says what changed."""
    straight = runs("one", None)
    result = cli("train", "t2v", *ARGS, "--steps", "3", "--data", three_prompt_cache, "--output-dir", tmp_path / "run",
                 "--resume", _step_2(straight), "--batch-size", "1")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: step-000002 was trained with another batch (2 per process x 1 processes x 2 "
                        "accumulation then, 1 x 1 x 2 now): the run continues at step 2 of a schedule cut into the "
                        "new batches, so its samples and random draws are not the ones the uninterrupted run would "
                        "have used"]


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_processes_resumes_on_three(runs, three_prompt_cache, tmp_path):
    """torch.distributed.checkpoint reshards 2 processes' FSDP2 shards onto 3: 2 x batch 3 = 3 x batch 2."""
    straight = runs("fsdp-batch-3", "fsdp", None, "--batch-size", "3")
    args = ["train", "t2v", *ARGS, "--data", three_prompt_cache, "--output-dir", tmp_path / "run", "--resume",
            _step_2(straight), "--batch-size", "2"]
    log = forked_launch(write_accelerate_config(tmp_path, "fsdp", gpus=3), *args, log=tmp_path / "launch.log").finish()
    assert "2 per process x 3 processes x 2 accumulation = 12 per step" in " ".join(log.split())
    _assert_same_run(Run(tmp_path / "run", log), straight)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoint_of_one_process_resumes_on_two_under_fsdp(runs, method):
    """A whole optimizer and the trainable weights' files, broadcast into FSDP2's shards by torch."""
    extra = ("--full",) if method == "full" else ()
    straight = runs(f"one-{method}" if extra else "one", None, None, *extra)
    resumed = runs(f"one-{method}-to-fsdp", "fsdp", _step_2(straight), *extra)
    assert "resumed from" in resumed.log and "at step 2" in resumed.log
    assert "FSDP2, full shard" in resumed.log
    _assert_same_run(resumed, straight, method)
