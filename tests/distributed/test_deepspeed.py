"""DeepSpeed ZeRO-2/3, with and without CPU offload, through `accelerate launch` on 2 CPU processes.

DeepSpeed runs on the CPU with its CPU accelerator over gloo (oneCCL is not installed), from the
files `cogtune config accelerate` writes; cogtune's optimizer (torch's AdamW) steps the offloaded
state, so DeepSpeed's compiled CPU Adam is not needed. Its collectives go over plain gloo here, not its
shared-memory op, which it would compile in every fresh environment (see tests/distributed/launch_hooks/).

One run per path, compared with one process and the same global batch (the same ARGS as the DDP
and FSDP tests, 2 processes x batch 1 x 2 accumulation). Measured on 2 CPU cores, largest weight
difference: ZeRO-2 LoRA 6.9e-8 (with optimizer offload the same), ZeRO-3 + offload LoRA 7.4e-8,
ZeRO-3 full fine-tuning 1.6e-5: within the DDP/FSDP tolerances. Resuming under ZeRO-3 is exact.
fp16 cannot run on the CPU (DeepSpeed: "Type fp16 is not supported on your device."): cogtune
refuses it there (tests/distributed/test_launch_checks.py); the `gpu` test below runs it.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from tests.distributed.conftest import accelerate_launch, finish, write_accelerate_config
from tests.distributed.forked import forked_launch
from tests.distributed.test_training import ARGS, Run, _in_process, assert_resumed_exactly, assert_same_training

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install cogtune[deepspeed])"),
]

# (strategy, method): each stage, CPU offload (of the optimizer, and of the parameters under ZeRO-3), LoRA and
# full fine-tuning, each once. `zero2-offload` (optimizer offload as under zero3-offload) also runs, and is left
# out for the suite's time: 2 x 1 equals 1 x 2 there within 6.9e-8 as well.
PATHS = [("zero2", "lora"), ("zero3", "full"), ("zero3-offload", "lora")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cache):
    """Runs by (strategy, method, resumed), each made once per module: 'one' is one process with batch 2."""
    root = tmp_path_factory.mktemp("deepspeed-runs")
    made: dict[tuple[str, str, bool], Run] = {}

    def get(strategy: str, method: str, resumed: bool = False) -> Run:
        key = (strategy, method, resumed)
        if key not in made:
            output = root / f"{strategy}-{method}{'-resumed' if resumed else ''}"
            args = ["train", "t2v", *ARGS, "--data", tiny_cache, "--output-dir", output]
            if method == "full":
                args.append("--full")
            if resumed:
                args += ["--resume", get(strategy, method).output_dir / "checkpoints" / "step-000002"]
            if strategy == "one":
                log = _in_process(*args, "--batch-size", "2")
            else:
                config = write_accelerate_config(root, strategy, gpus=2)
                if key == ("zero2", "lora", False):  # through `accelerate launch`; the others forked (forked.py)
                    log = finish(accelerate_launch(config, *args, "--batch-size", "1"), timeout=400)
                else:
                    log = forked_launch(config, *args, "--batch-size", "1", log=root / f"{output.name}.log").finish(400)
            made[key] = Run(output, log)
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "method"), PATHS)
def test_two_deepspeed_processes_equal_one_with_the_same_global_batch(runs, strategy, method):
    two, one = runs(strategy, method), runs("one", method)
    assert f"DeepSpeed ZeRO-{strategy[4]}" in two.log
    assert ("offloaded to cpu" in two.log) is strategy.endswith("-offload")
    assert "1 per process x 2 processes x 2 accumulation = 4 per step" in two.log
    assert_same_training(two, one, method, f"{strategy} {method}")


@pytest.mark.slow
def test_deepspeed_saves_plain_diffusers_files(runs, tiny_model_dir):
    """Gathered from the shards: a LoRA diffusers loads, a transformer/ folder `from_pretrained` loads (no zero_to_fp32)."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    lora, lora_one = runs("zero3-offload", "lora").output_dir, runs("one", "lora").output_dir
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as two, \
            safe_open(str(lora_one / "pytorch_lora_weights.safetensors"), "pt") as one:
        assert two.metadata() == one.metadata() and sorted(two.keys()) == sorted(one.keys())
        count = len(list(two.keys()))
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(lora)
    [adapter] = pipe.get_active_adapters()
    assert len(get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)) == count

    full, full_one = runs("zero3", "full").output_dir, runs("one", "full").output_dir
    assert sorted(p.name for p in (full / "transformer").iterdir()) == \
        sorted(p.name for p in (full_one / "transformer").iterdir())
    loaded = CogVideoXTransformer3DModel.from_pretrained(full / "transformer").state_dict()
    base = CogVideoXTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").state_dict()
    assert loaded.keys() == base.keys() and any(not torch.equal(loaded[k], base[k]) for k in loaded)  # trained
    checkpoint = lora / "checkpoints" / "step-000002"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()  # diffusers format beside DeepSpeed's state
    assert (checkpoint / "pytorch_model").is_dir()


@pytest.mark.slow
def test_zero3_resume_continues_exactly(runs):
    """2 steps, then a resume from that checkpoint (DeepSpeed's sharded model and optimizer state) for 2 more,
    equal 4 steps straight."""
    straight, resumed = runs("zero3", "full"), runs("zero3", "full", resumed=True)
    assert_resumed_exactly(straight, resumed)


@pytest.mark.slow
def test_deepspeed_state_is_read_without_running_code(runs, tmp_path):
    """DeepSpeed reads its own `pytorch_model/*.pt` with an unrestricted torch.load. cogtune reads each first
    with torch's weights-only unpickler (DeepSpeed's state classes allowed): DeepSpeed's real files pass, under
    ZeRO-2 and ZeRO-3, and a crafted one (every other file unchanged) is named in one line and nothing runs."""
    import os

    from cogtune.errors import ConfigError
    from cogtune.train.reshard import DEEPSPEED_DIR, check_pickles

    for strategy, method in (("zero2", "lora"), ("zero3", "full")):
        genuine = runs(strategy, method).output_dir / "checkpoints" / "step-000002"
        assert sorted(genuine.glob(f"{DEEPSPEED_DIR}/*optim_states.pt")) and sorted(genuine.glob(f"{DEEPSPEED_DIR}/*model_states.pt"))
        check_pickles(genuine)

    crafted = tmp_path / "step-000002"
    shutil.copytree(genuine, crafted)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    [target, *_] = sorted(crafted.glob(f"{DEEPSPEED_DIR}/*optim_states.pt"))
    state = torch.load(target, map_location="cpu", weights_only=False)  # DeepSpeed's own file, written above
    state["loss_scaler"] = Exploit()
    torch.save(state, target)
    with pytest.raises(ConfigError) as refused:
        check_pickles(crafted)
    assert str(refused.value).startswith(f"{target} cannot be loaded without running code from it")
    assert "\n" not in str(refused.value) and not marker.exists()


# --- a DeepSpeed checkpoint on another number of processes, or without DeepSpeed: refused in one line,
# before any weight loads. DeepSpeed keeps the ZeRO optimizer state as one partition per process and loads
# it on as many processes only (its own error: "Automatic adjustment of ZeRO's optimizer state partitioning
# with a new world size is not currently supported"), under every ZeRO stage (the check is the same for all,
# so ZeRO-2 stands for them here); nor does it load a checkpoint it did not write (an AssertionError deep
# inside). cogtune says so up front. The checkpoints are the step-2 ones of the runs above.

def _refused_launch(tmp_path, tiny_cache, strategy: str, processes: int, checkpoint) -> tuple[int, str]:
    """`accelerate launch` of 2 training steps on `processes` x batch (2 / processes), resuming `checkpoint`:
    its exit code and its output, unwrapped."""
    folder = tmp_path / f"{strategy}-{processes}"
    folder.mkdir()
    config = write_accelerate_config(folder, strategy, gpus=processes)
    process = accelerate_launch(config, "train", "t2v", *ARGS, "--steps", "2", "--data", tiny_cache,
                                "--output-dir", tmp_path / "run", "--batch-size", str(2 // processes),
                                "--resume", checkpoint)
    log, _ = process.communicate(timeout=400)
    return process.returncode, " ".join(log.split())


def _errors(log: str) -> list[str]:
    return [f"error:{part.split(' (hint:')[0]}" for part in log.split("error:")[1:]]


@pytest.mark.slow
def test_a_zero2_checkpoint_of_two_processes_is_refused_on_one(runs, cli, tmp_path, tiny_cache):
    checkpoint = runs("zero2", "lora").output_dir / "checkpoints" / "step-000002"  # the launch succeeded (finish)
    assert (checkpoint / "pytorch_model").is_dir()

    code, log = _refused_launch(tmp_path, tiny_cache, "zero2", 1, checkpoint)  # DeepSpeed, 1 process
    assert code != 0
    assert _errors(log) == [f"error: {checkpoint} holds DeepSpeed's ZeRO state split over 2 processes, which only "
                            "DeepSpeed on 2 processes can resume; this launch is DeepSpeed on 1 process"], log[-3000:]
    assert "training run" not in log  # before the run's summary, so before any weight loads

    result = cli("train", "t2v", *ARGS, "--steps", "2", "--data", tiny_cache, "--output-dir", tmp_path / "one",
                 "--batch-size", "2", "--resume", checkpoint)  # one process without DeepSpeed
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {checkpoint} holds DeepSpeed's ZeRO state split over 2 processes, which only DeepSpeed on 2 "
        "processes can resume; this launch is one process without DeepSpeed (hint: resume it with a DeepSpeed launch "
        "of 2 processes, or train without --resume)"]


@pytest.mark.slow
def test_a_checkpoint_written_without_deepspeed_is_refused_under_deepspeed(runs, tmp_path, tiny_cache):
    checkpoint = runs("one", "lora").output_dir / "checkpoints" / "step-000002"  # one process, no DeepSpeed
    code, log = _refused_launch(tmp_path, tiny_cache, "zero3", 2, checkpoint)
    assert code != 0
    # every process refuses it; the user reads it once
    assert _errors(log) == [f"error: {checkpoint} was written without DeepSpeed, and DeepSpeed resumes only its own "
                            "checkpoints"], log[-3000:]
    assert "training run" not in log  # before the run's summary, so before any weight loads


@pytest.mark.gpu
@pytest.mark.slow
def test_deepspeed_fp16_on_gpus(tmp_path, tiny_cache):
    """fp16, which DeepSpeed's CPU accelerator refuses, under ZeRO-2 on the GPUs there are (1 or 2)."""
    from cogtune.accelerate_config import LaunchSettings, accelerate_config_yaml
    from tests.ports import free_port

    gpus = min(torch.cuda.device_count(), 2)
    config = tmp_path / "zero2.yaml"
    config.write_text(accelerate_config_yaml(LaunchSettings("zero2", gpus=gpus, mixed_precision="fp16",
                                                            main_process_port=free_port())))
    log = finish(accelerate_launch(config, "train", "t2v", "--model", "tiny", "--steps", "2", "--rank", "4",
                                   "--mixed-precision", "fp16", "--data", tiny_cache, "--batch-size", "1",
                                   "--output-dir", tmp_path / "run"))
    assert "DeepSpeed ZeRO-2" in log and "mixed precision fp16" in log
    run = Run(tmp_path / "run", log)
    assert all(torch.isfinite(torch.tensor(run.losses))) and run.weights
