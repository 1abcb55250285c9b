"""`cogtune config accelerate`: a ready accelerate config file for several GPUs and machines."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cogtune.accelerate_config import MIXED_PRECISIONS, STRATEGIES
from cogtune.cli.common import examples
from cogtune.cli.options import completes

app = typer.Typer(help="Write configuration files for other tools (accelerate).", no_args_is_help=True)

EPILOG = examples(
    "cogtune config accelerate --strategy fsdp --gpus 8 > fsdp.yaml",
    "cogtune config accelerate --strategy zero3-offload --gpus 4 --mixed-precision bf16 > zero3.yaml",
    "cogtune config accelerate --strategy fsdp-hybrid --gpus 8 --machines 2 --main-process-ip 10.0.0.1 > hybrid.yaml",
    "accelerate launch --config_file fsdp.yaml -m cogtune train t2v --config run.toml",
)


@app.command("accelerate", epilog=EPILOG)
def accelerate(
    strategy: Annotated[
        str,
        typer.Option("--strategy", "-s", show_default=False, autocompletion=completes(tuple(STRATEGIES)),
                     help="ddp, fsdp, fsdp-hybrid, zero2, zero2-offload, zero3 or zero3-offload."),
    ],
    gpus: Annotated[int, typer.Option("--gpus", "-g", help="GPUs (processes) per machine.", min=1)] = 1,
    machines: Annotated[int, typer.Option("--machines", help="Machines (nodes).", min=1)] = 1,
    machine_rank: Annotated[
        int, typer.Option("--machine-rank", help="This machine's index (or `accelerate launch --machine_rank`).", min=0)
    ] = 0,
    main_process_ip: Annotated[
        Optional[str], typer.Option("--main-process-ip", help="Address of machine 0 (several machines).")
    ] = None,
    main_process_port: Annotated[int, typer.Option("--main-process-port", help="Port the processes meet on.")] = 29500,
    mixed_precision: Annotated[
        str, typer.Option("--mixed-precision", help="bf16, fp16 or no.", autocompletion=completes(MIXED_PRECISIONS))
    ] = "bf16",
) -> None:
    """Print an accelerate config for a strategy (DDP, FSDP2, DeepSpeed ZeRO) on stdout.

    Launch training with it: `accelerate launch --config_file FILE -m cogtune train t2v ...`.
    """
    from cogtune.accelerate_config import LaunchSettings, accelerate_config_yaml

    settings = LaunchSettings(strategy=strategy, gpus=gpus, machines=machines, machine_rank=machine_rank,
                              main_process_ip=main_process_ip, main_process_port=main_process_port,
                              mixed_precision=mixed_precision)
    typer.echo(accelerate_config_yaml(settings), nl=False)
