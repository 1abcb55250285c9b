"""`cogtune config accelerate`: a file accelerate's own loader and launcher accept, for every strategy.

DeepSpeed cannot run here (no deepspeed, no GPU): its files are checked through accelerate's
launcher and `DeepSpeedPlugin` (which need no deepspeed), and cogtune's own DeepSpeed settings
on that plugin; the training run itself is not faked.
"""

from __future__ import annotations

import os
import types
from unittest import mock

import pytest

from cogtune.accelerate_config import STRATEGIES

CASES = {  # strategy: extra arguments
    "ddp": [],
    "fsdp": [],
    "fsdp-hybrid": ["--machines", "2", "--main-process-ip", "10.0.0.1"],
    "zero2": [],
    "zero2-offload": [],
    "zero3": [],
    "zero3-offload": ["--machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1"],
}


def _generate(cli, tmp_path, strategy):
    result = cli("config", "accelerate", "--strategy", strategy, "--gpus", "4", *CASES[strategy])
    assert result.exit_code == 0, result.stderr
    path = tmp_path / f"{strategy}.yaml"
    path.write_text(result.stdout)
    return path


def _launch_environment(path):
    """What `accelerate launch --config_file PATH -m cogtune ...` puts in the environment of every process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "cogtune", "train", "t2v"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_every_strategy_has_a_case():
    assert set(CASES) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", list(CASES))
def test_accelerate_loads_the_file(cli, tmp_path, strategy):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(_generate(cli, tmp_path, strategy)))
    assert isinstance(config, ClusterConfig)
    machines = 2 if "--machines" in CASES[strategy] else 1
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (4 * machines, machines, "bf16")
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp-hybrid": "FSDP"}.get(
        strategy, "DEEPSPEED")
    if machines > 1:
        assert config.main_process_ip == "10.0.0.1"


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-hybrid"])
def test_fsdp_files_wrap_each_block_with_fsdp2(cli, tmp_path, strategy):
    from accelerate.utils import FullyShardedDataParallelPlugin, ParallelismConfig

    env = _launch_environment(_generate(cli, tmp_path, strategy))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap == ["CogVideoXBlock"]
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        if strategy == "fsdp-hybrid":
            parallelism = ParallelismConfig()
            assert (parallelism.dp_replicate_size, parallelism.dp_shard_size) == (2, 4)  # machines x GPUs
        else:
            assert "ACCELERATE_USE_PARALLELISM_CONFIG" not in env


def test_the_ddp_file_launches_data_parallel(cli, tmp_path):
    env = _launch_environment(_generate(cli, tmp_path, "ddp"))
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize("strategy", ["zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_deepspeed_files_and_what_cogtune_fills_in(cli, tmp_path, strategy):
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from cogtune.distributed import configure_deepspeed, is_sharded, strategy_name

    env = _launch_environment(_generate(cli, tmp_path, strategy))
    stage, offload = (3 if strategy.startswith("zero3") else 2), strategy.endswith("-offload")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == ("cpu" if offload else "none")
    assert zero["offload_param"]["device"] == ("cpu" if offload and stage == 3 else "none")
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the final save gathers whole weights

    # The trainer's settings on accelerate's plugin (an accelerator stand-in: no DeepSpeed runs here).
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=8,
                                        state=types.SimpleNamespace(deepspeed_plugin=plugin))
    configure_deepspeed(accelerator, batch_size=2, gradient_accumulation=3, max_grad_norm=0.5)
    config = plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 3, 48, 0.5)
    assert config.get("zero_force_ds_cpu_optimizer", True) is not offload
    assert is_sharded(accelerator) is (stage == 3)
    assert strategy_name(accelerator).startswith(f"DeepSpeed ZeRO-{stage}")


def test_the_file_says_how_to_launch(cli):
    result = cli("config", "accelerate", "--strategy", "zero3", "--gpus", "8", "--machines", "2",
                 "--main-process-ip", "10.0.0.1", "--main-process-port", "6000")
    assert "# Run: accelerate launch --config_file FILE --machine_rank R -m cogtune train t2v" in result.stdout
    assert "pip install deepspeed" in result.stdout
    assert "main_process_port: 6000" in result.stdout


@pytest.mark.parametrize(("arguments", "message"), [
    (["--strategy", "fsdp-hybrid", "--gpus", "8"], "fsdp-hybrid shards within each machine"),
    (["--strategy", "ddp", "--gpus", "1"], "ddp needs 2 or more processes"),
    (["--strategy", "fsdp", "--gpus", "8", "--machines", "2"], "several machines need --main-process-ip"),
    (["--strategy", "fsdp", "--machines", "2", "--machine-rank", "2", "--main-process-ip", "h"],
     "--machine-rank must be in [0, 1]"),
    (["--strategy", "zero4"], "unknown strategy 'zero4'"),
    (["--strategy", "fsdp", "--mixed-precision", "fp8"], "--mixed-precision must be one of bf16, fp16, no"),
])
def test_impossible_layouts_are_one_line_errors(cli, arguments, message):
    result = cli("config", "accelerate", *arguments)
    assert result.exit_code == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
