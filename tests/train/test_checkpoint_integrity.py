"""Checkpoints record their files (sizes and hashes); resuming verifies them and names the bad file.

Also: weights that are not finite are never published as a checkpoint, pruning never leaves a
half-deleted checkpoint that counts as complete, and a full disk while saving is one line naming
the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from cogtune.train import checkpoint
from cogtune.train.run_folder import is_model_card

STEP = "step-{:06d}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cache):
    """A run of 4 steps with checkpoints at steps 2 and 4 (copied by each test before damaging it)."""
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import CheckpointConfig, LoraConfig, ValidationConfig

    out = tmp_path_factory.mktemp("integrity") / "run"
    run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(out), steps=4,
                             lora=LoraConfig(rank=4), checkpointing=CheckpointConfig(every=2, keep=0),
                             validation=ValidationConfig(final=False)))
    return out


def _args(cache, out, *more):
    return ("train", "t2v", "--model", "tiny", "--data", cache, "--output-dir", out, "--rank", "4",
            "--checkpoint-every", "2", "--keep-checkpoints", "0", "--validation-every", "0", *more)


def _copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _ckpt(out, step):
    return out / "checkpoints" / STEP.format(step)


def test_each_checkpoint_records_its_files(trained):
    state = json.loads((_ckpt(trained, 4) / "trainer_state.json").read_text())
    assert {"optimizer.bin", "pytorch_lora_weights.safetensors", "config.toml"} <= set(state["files"])
    assert all(set(record) == {"size", "sha256"} for record in state["files"].values())
    assert checkpoint.verify_checkpoint(_ckpt(trained, 4)) is None


def test_resume_latest_falls_back_from_a_truncated_optimizer_state(cli, trained, tiny_cache, tmp_path):
    out = _copy(trained, tmp_path)
    damaged = _ckpt(out, 4) / "optimizer.bin"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as handle:
        handle.truncate(100)
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", "latest"))
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[0] == (f"warning: checkpoint step-000004 is damaged: {damaged} has 100 bytes, but {size} were "
                           "written (truncated or replaced); trying step-000002")
    assert f"resumed from {_ckpt(out, 2)} at step 2" in result.stderr


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(cli, trained, tiny_cache, tmp_path):
    out = _copy(trained, tmp_path)
    damaged = _ckpt(out, 4) / "pytorch_lora_weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"\0" * 10)  # same size, other content
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", _ckpt(out, 4)))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"error: cannot resume from {_ckpt(out, 4)}: {damaged} is not the file that was written "
                         f"(its SHA-256 differs) (hint: resume from {_ckpt(out, 2)} instead)")
    assert "Traceback" not in result.stderr and "Error" not in lines[-1]


def _forge(state_file, state):
    """Write a trainer state with its digest re-made, as someone who knows the format would."""
    state_file.write_text(json.dumps({**state, "digest": checkpoint._state_digest(state)}))


def test_a_trainer_state_whose_step_disagrees_is_refused(cli, trained, tiny_cache, tmp_path):
    out = _copy(trained, tmp_path)
    state_file = _ckpt(out, 4) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    _forge(state_file, {**state, "step": 3})
    assert checkpoint.verify_checkpoint(_ckpt(out, 4)) == (
        f"{state_file} says step 3, but it is in the checkpoint of step 4")

    # Step 2's files under step 4's name, its trainer state saying step 4: only the optimizer knows.
    shutil.rmtree(_ckpt(out, 4))
    shutil.copytree(_ckpt(out, 2), _ckpt(out, 4))
    state = json.loads(state_file.read_text())
    _forge(state_file, {**state, "step": 4})
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", _ckpt(out, 4)))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {state_file} says step 4, but the optimizer state in {_ckpt(out, 4)} has taken 2 steps")


def test_an_edited_trainer_state_is_damaged_and_skipped(cli, trained, tiny_cache, tmp_path):
    """An edit of the learning-rate schedule's state would resume silently with other results."""
    out = _copy(trained, tmp_path)
    state_file = _ckpt(out, 4) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["lr_scheduler"]["base_lrs"] = [1.0]
    state_file.write_text(json.dumps(state))
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", "latest"))
    assert result.exit_code == 0, result.stderr
    assert (f"warning: checkpoint step-000004 is damaged: {state_file} was changed after it was written (its "
            "digest differs); trying step-000002") in result.stderr
    assert f"resumed from {_ckpt(out, 2)} at step 2" in result.stderr


def _rewrite_lora(path, change):
    """Rewrite a checkpoint's LoRA file through `change(tensors)`, and re-make every record of it (forged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    state_file = path.parent / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = checkpoint.record_files(path.parent)
    _forge(state_file, state)


def test_nan_weights_with_their_hashes_remade_are_never_resumed_nor_good(cli, trained, tiny_cache, tmp_path):
    import torch

    out = _copy(trained, tmp_path)
    weights = _ckpt(out, 4) / "pytorch_lora_weights.safetensors"
    first = {}

    def poison(tensors):
        first["name"] = sorted(tensors)[0]
        tensors[first["name"]] = torch.full_like(tensors[first["name"]], float("nan"))

    _rewrite_lora(weights, poison)
    assert checkpoint.verify_checkpoint(_ckpt(out, 4)) == f"{weights} holds NaN or infinite values ({first['name']})"
    assert checkpoint.last_good_checkpoint(out) == _ckpt(out, 2)
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", "latest"))
    assert result.exit_code == 0, result.stderr
    assert f"resumed from {_ckpt(out, 2)} at step 2" in result.stderr


def test_a_lora_file_lacking_a_tensor_is_refused_naming_it(cli, trained, tiny_cache, tmp_path):
    out = _copy(trained, tmp_path)
    weights = _ckpt(out, 4) / "pytorch_lora_weights.safetensors"
    dropped = {}

    def drop(tensors):
        dropped["name"] = sorted(tensors)[-1]
        del tensors[dropped["name"]]

    _rewrite_lora(weights, drop)
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", _ckpt(out, 4)))
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot load the checkpoint {_ckpt(out, 4)}: {weights} lacks 1 of the LoRA's "
                           "weights, e.g. ")
    assert "Traceback" not in result.stderr


class _Killed(BaseException):
    pass


def test_a_checkpoint_half_deleted_by_pruning_does_not_count(cli, trained, tiny_cache, tmp_path, monkeypatch):
    out = _copy(trained, tmp_path)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if "step-000002" in str(path) and (path := type(out)(path)).exists():
            (path / "optimizer.bin").unlink()
            raise _Killed()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(_Killed):
        cli(*_args(tiny_cache, out, "--steps", "6", "--resume", "latest", "--keep-checkpoints", "2"))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    listed = checkpoint.checkpoint_dirs(out)
    assert [p.name for p in listed] == ["step-000004", "step-000006"]
    assert all((p / "optimizer.bin").is_file() for p in listed)
    result = cli(*_args(tiny_cache, out, "--steps", "7", "--resume", "latest"))
    assert result.exit_code == 0 and f"resumed from {_ckpt(out, 6)} at step 6" in result.stderr
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the leftover is swept


def test_non_finite_weights_are_never_the_last_good_checkpoint(cli, tiny_cache, tmp_path, monkeypatch):
    import torch

    from cogtune.train import loop

    real_keep = loop.keep_tensor_learning_rates
    steps = []

    def poison_after_step_3(optimizer, rates):
        real_keep(optimizer, rates)
        steps.append(1)
        if len(steps) == 3:  # the weights break in step 3's update; step 3's loss was still finite
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    monkeypatch.setattr(loop, "keep_tensor_learning_rates", poison_after_step_3)
    out = tmp_path / "run"
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--checkpoint-every", "1"))
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the weights became non-finite (NaN or infinity) at step 3 (")
    assert f"the last good checkpoint is {_ckpt(out, 2)}" in last
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-000001", "step-000002"]


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file(cli, tiny_cache, tmp_path, monkeypatch):
    """torch.save's own words for a full disk name neither the file nor the cause."""
    import torch

    from cogtune import fsutil

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04" + b"\0" * 100)
            monkeypatch.setattr(fsutil, "free_bytes", lambda path: 0)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    _assert_the_full_disk_names(cli, tiny_cache, tmp_path / "run", "optimizer.bin")


def _assert_the_full_disk_names(cli, cache, out, name):
    """The first checkpoint fills the disk: one line naming its file `name`, and no checkpoint is left."""
    result = cli(*_args(cache, out, "--steps", "4"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no space left on device while writing {_ckpt(out, 2)}/{name} "
        "(hint: free some space on that disk (or write somewhere else) and run again)")
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


def test_training_on_a_really_full_disk(cli, tiny_cache, tmp_path):
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = cli(*_args(tiny_cache, disk / "run", "--steps", "4"))
        assert result.exit_code == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left on device while writing {disk / 'run'}/"), last
        assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))
        assert all(checkpoint.verify_checkpoint(p) is None for p in checkpoint.checkpoint_dirs(disk / "run"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_new_run_never_writes_over_another(cli, trained, tiny_cache, tmp_path):
    out = _copy(trained, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = cli(*_args(tiny_cache, out, "--steps", "2"))
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"{out} already holds a training run (config.toml, checkpoints, pytorch_lora_weights.safetensors" in line
    assert "--resume latest" in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_an_empty_or_new_folder_is_fine(cli, tiny_cache, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine\n")
    result = cli(*_args(tiny_cache, tmp_path / "run", "--steps", "1"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine\n"


def test_a_readme_of_the_users_is_never_replaced_by_the_model_card(cli, trained, tiny_cache, tmp_path):
    (tmp_path / "mine").mkdir()
    mine = tmp_path / "mine" / "README.md"
    mine.write_text("# my notes\n")
    result = cli(*_args(tiny_cache, tmp_path / "mine", "--steps", "1"))
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"{mine} is not a model card cogtune wrote" in line
    assert mine.read_text() == "# my notes\n"
    # the card of a finished run is the run's own: --overwrite replaces it like the other outputs
    out = _copy(trained, tmp_path)
    assert is_model_card(out / "README.md")
    result = cli(*_args(tiny_cache, out, "--steps", "1", "--overwrite"))
    assert result.exit_code == 0, result.stderr
    assert is_model_card(out / "README.md")


@pytest.mark.parametrize(("flags", "named"), [
    (("--rank", "8"), "lora.rank 4 there, 8 now"),
    (("--lora-alpha", "2"), "lora.alpha 4.0 there, 2.0 now"),
])
def test_resume_refuses_a_checkpoint_of_another_run(cli, trained, tiny_cache, tmp_path, flags, named):
    out = _copy(trained, tmp_path)
    result = cli(*_args(tiny_cache, out, "--steps", "6", "--resume", "latest"), *flags)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"{_ckpt(out, 4)} belongs to another run (" in line and named in line


def test_resume_refuses_another_models_checkpoint(trained, tiny_cache):
    from cogtune.errors import ConfigError
    from cogtune.train import TrainConfig
    from cogtune.train.config import LoraConfig

    config = TrainConfig(model="tiny-rotary", data=str(tiny_cache), output_dir=str(trained), lora=LoraConfig(rank=4))
    with pytest.raises(ConfigError, match="model 'tiny' there, 'tiny-rotary' now"):
        checkpoint.check_same_run(config, _ckpt(trained, 4))


def test_resume_accepts_the_same_model_under_another_name(trained, tiny_cache):
    """The tiny preset and its own folder name the same transformer: that is the same run."""
    from cogtune.models.tiny import ensure_tiny_model
    from cogtune.train import TrainConfig
    from cogtune.train.config import LoraConfig

    config = TrainConfig(model=str(ensure_tiny_model("tiny")), data=str(tiny_cache), output_dir=str(trained),
                         lora=LoraConfig(rank=4))
    checkpoint.check_same_run(config, _ckpt(trained, 4))


def test_config_toml_records_every_value_the_run_used(trained):
    """Defaults that depend on other settings are written out, so the file reproduces the run."""
    from cogtune.config import read_toml

    written = read_toml(trained / "config.toml")
    assert written["lora"]["alpha"] == 4.0  # = the rank, the default
    assert written["caption_dropout"] == 0.0  # t2v's default
    assert written["optimizer"]["lr"] == 1e-4
    assert written["checkpointing"]["every"] == 2


def test_overwrite_starts_over_and_keeps_other_files(cli, trained, tiny_cache, tmp_path):
    out = _copy(trained, tmp_path)
    (out / "notes.txt").write_text("mine\n")
    result = cli(*_args(tiny_cache, out, "--steps", "2", "--overwrite"))
    assert result.exit_code == 0, result.stderr
    assert "--overwrite: deleted the previous run's outputs" in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # the old step-4 is gone
    assert (out / "notes.txt").read_text() == "mine\n"
    from cogtune.config import read_toml

    assert read_toml(out / "config.toml")["overwrite"] is False  # a later run from this file must not delete


def test_overwrite_and_resume_exclude_each_other(cli, trained, tiny_cache, tmp_path):
    result = cli(*_args(tiny_cache, tmp_path / "run", "--overwrite", "--resume", "latest"))
    assert result.exit_code == 1 and "exclude each other" in result.stderr


def test_a_checkpoint_holds_no_rng_pickle(trained):
    assert not list(_ckpt(trained, 4).glob("random_states_*.pkl"))


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_pickle_that_would_run_code_is_refused_naming_the_file(cli, trained, tiny_cache, tmp_path, name):
    """A crafted pickle (its reduce calls os.system) with every hash re-made: nothing runs, the file is named."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    out = _copy(trained, tmp_path)
    path = _ckpt(out, 4) / name
    path.write_bytes(pickle.dumps({"state": Exploit()}))
    state_file = _ckpt(out, 4) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = checkpoint.record_files(_ckpt(out, 4))
    _forge(state_file, state)
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", _ckpt(out, 4)))
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path} cannot be loaded without running code from it")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_stray_folder_and_a_step_without_its_state_are_named(cli, trained, tiny_cache, tmp_path):
    """`checkpoints/step-backup` (a user's copy) is ignored with a warning; `step-000004` without its
    trainer_state.json is a damaged checkpoint, skipped with a warning, like any other."""
    out = _copy(trained, tmp_path)
    shutil.copytree(_ckpt(out, 4), out / "checkpoints" / "step-backup")
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (_ckpt(out, 4) / "trainer_state.json").unlink()
    result = cli(*_args(tiny_cache, out, "--steps", "5", "--resume", "latest"))
    assert result.exit_code == 0, result.stderr
    assert f"warning: ignoring {out / 'checkpoints' / 'step-backup'}: not a checkpoint" in result.stderr
    assert f"warning: ignoring {out / 'checkpoints' / 'notes.txt'}: not a checkpoint" in result.stderr
    assert (f"warning: checkpoint step-000004 is damaged: {_ckpt(out, 4) / 'trainer_state.json'} is missing; "
            "trying step-000002") in result.stderr
    assert f"resumed from {_ckpt(out, 2)} at step 2" in result.stderr
    assert (out / "checkpoints" / "step-backup" / "trainer_state.json").is_file()  # a user's folder: left alone


def test_a_full_disk_at_a_checkpoints_weights_names_the_weights_file(cli, tiny_cache, tmp_path, monkeypatch):
    """The checkpoint's LoRA file fills the disk (safetensors reports ENOSPC): the file is named, not the folder."""
    import errno

    from cogtune.lora import format as lora_format

    real = lora_format.save_file

    def full(weights, filename, *args, **kwargs):
        if ".tmp-step-" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(weights, filename, *args, **kwargs)

    monkeypatch.setattr(lora_format, "save_file", full)
    _assert_the_full_disk_names(cli, tiny_cache, tmp_path / "run", "pytorch_lora_weights.safetensors")


def test_fsdp_metadata_that_would_run_code_is_refused_before_torch_reads_it(tmp_path):
    """torch.distributed.checkpoint reads its `.metadata` with a plain pickle.load: cogtune parses it first
    with an unpickler that takes only what that file holds (a real one, written by torch, passes)."""
    import pickle
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from cogtune.errors import ConfigError
    from cogtune.train.reshard import FSDP_OPTIMIZER_DIR, check_pickles

    folder = tmp_path / "step-000002" / FSDP_OPTIMIZER_DIR
    state = {"optimizer": {"state": {"w": {"exp_avg": torch.ones(3, 4), "step": torch.tensor(2.0)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w"]}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    check_pickles(folder.parent)  # torch's own metadata passes

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ConfigError, match=f"^{folder / '.metadata'} cannot be loaded without running code"):
        check_pickles(folder.parent)
    assert not (tmp_path / "pwned").exists()
