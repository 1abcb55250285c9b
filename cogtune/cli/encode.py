"""`cogtune encode`: the latent and text-embedding cache.

The options are `EncodeConfig`'s flagged fields and its dataset's (cogtune/encode/config.py,
cogtune/data/dataset.py), made by `settings_options`; the cache's `config.toml` records them all.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import ConfigFileOpt
from cogtune.cli.settings import Overrides, settings_options
from cogtune.encode.config import EncodeConfig

EPILOG = examples(
    "cogtune encode --model cogvideox-5b --data-root data/disney --output-dir cache/disney "
    "--frames 49 --height 480 --width 720",
    "cogtune encode --model tiny --data-root demo/data --output-dir demo/cache --dry-run",
    "cogtune encode --model cogvideox-5b --dataset-config datasets.toml --output-dir cache/mixed --buckets 49x480x720",
)


@settings_options(EncodeConfig)
def encode(
    overrides: Overrides = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (items, buckets, disk) and stop.")] = False,
    config_file: ConfigFileOpt = None,
) -> None:
    """Encode a dataset into a reusable latent cache. Re-running skips finished items."""
    from cogtune import startup
    from cogtune.config import load_config

    config = load_config(EncodeConfig, config_file, overrides)  # settings checked before any library loads
    if not dry_run:
        startup.load_libraries()
    from cogtune.encode import encode_dataset

    encode_dataset(config, dry_run=dry_run)
