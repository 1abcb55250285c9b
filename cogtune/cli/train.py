"""`cogtune train t2v` and `cogtune train i2v`: one engine, one set of options, two tasks.

The options are `TrainConfig`'s flagged fields (cogtune/train/config.py), made by `settings_options`.
"""

from __future__ import annotations

from typing import Literal

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import ConfigFileOpt
from cogtune.cli.settings import Overrides, settings_options
from cogtune.train.config import TrainConfig

app = typer.Typer(help="Train a LoRA or a full fine-tune on a latent cache.", no_args_is_help=True)

_TASK_HELP = {
    "t2v": "Text-to-video: train on a cache from `cogtune encode`.",
    "i2v": "Image-to-video: train an I2V model on a cache with condition-image latents.",
}
_EXAMPLES = {
    "t2v": examples(
        "cogtune train t2v --model cogvideox-5b --data cache/disney --output-dir runs/disney --rank 64 --steps 2000 "
        "--validation-prompt 'A panda playing a guitar in a bamboo forest' --validation-every 500",
        "cogtune train t2v --model tiny --data demo/cache --output-dir demo/run2 --steps 10 --validation-steps 10",
        "torchrun --nproc_per_node 2 -m cogtune train t2v --config run.toml",
    ),
    "i2v": examples(
        "cogtune train i2v --model cogvideox-5b-i2v --data cache/disney-i2v --output-dir runs/i2v --rank 64",
        "cogtune encode --model tiny-i2v --data-root demo/data --output-dir demo/cache-i2v",
        "cogtune train i2v --model tiny-i2v --data demo/cache-i2v --output-dir demo/run-i2v --steps 10 "
        "--validation-steps 10",
    ),
}


def _make_command(task: Literal["t2v", "i2v"]):
    @settings_options(TrainConfig)
    def command(overrides: Overrides = None, config_file: ConfigFileOpt = None) -> None:
        from cogtune import startup
        from cogtune.config import load_config

        config = load_config(TrainConfig, config_file, {**overrides, "task": task})  # checked before any library loads
        startup.load_libraries()
        from cogtune.train import run_training

        run_training(config)

    command.__doc__ = _TASK_HELP[task]
    command.__name__ = f"train_{task}"
    return command


app.command("t2v", epilog=_EXAMPLES["t2v"])(_make_command("t2v"))
app.command("i2v", epilog=_EXAMPLES["i2v"])(_make_command("i2v"))
