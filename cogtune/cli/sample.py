"""`cogtune sample`: videos from a base model, a LoRA or a full fine-tune.

The options are `SampleConfig`'s flagged fields (cogtune/sample_config.py), made by `settings_options`.
"""

from __future__ import annotations

from cogtune.cli.common import examples
from cogtune.cli.options import ConfigFileOpt
from cogtune.cli.settings import Overrides, settings_options
from cogtune.sample_config import SampleConfig

EPILOG = examples(
    "cogtune sample --model THUDM/CogVideoX-5b --lora runs/disney --prompt 'A panda playing a guitar in a bamboo forest' "
    "--output panda.mp4 --scheduler dpm --dynamic-cfg",
    "cogtune sample --model THUDM/CogVideoX-5b-I2V --image first.png --prompt 'The cat jumps' --output cat.mp4 "
    "--offload model --vae-tiling",
    "cogtune sample --model tiny --prompt 'A red circle moves left across a dark background.' --output red.mp4 "
    "--steps 10 --preview png",
)


@settings_options(SampleConfig)
def sample(overrides: Overrides = None, config_file: ConfigFileOpt = None) -> None:
    """Generate videos with a base model, a trained LoRA, or a full fine-tune."""
    from cogtune import report, startup
    from cogtune.config import load_config

    config = load_config(SampleConfig, config_file, overrides)  # settings checked before any library loads
    startup.load_libraries()
    from cogtune.sample import run_sample

    for path in run_sample(config):
        report.success(f"wrote {path}")
