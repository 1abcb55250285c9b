"""`cogtune dataset validate` and `cogtune dataset download`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import DataRootArg, FramesOpt, HeightOpt, OptionalModelOpt, WidthOpt
from cogtune.cli.settings import Overrides, settings_options
from cogtune.data.dataset import DatasetConfig

app = typer.Typer(help="Check datasets before training, and fetch them from the Hub.", no_args_is_help=True)


@app.command(
    "validate",
    epilog=examples(
        "cogtune dataset validate data/ --frames 49 --height 480 --width 720 --model cogvideox-5b",
        "cogtune dataset validate data/ --json > report.json",
        "cogtune dataset validate data/ --dataset-file metadata.csv --caption-column text --video-column file",
    ),
)
@settings_options(DatasetConfig, exclude=("root", "resize_mode"))  # the root is an argument; no resizing here
def validate(
    data_root: DataRootArg,
    overrides: Overrides = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    model: OptionalModelOpt = None,
    deep: Annotated[bool, typer.Option("--deep", help="Decode every frame of every clip (slow, thorough).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Check a dataset: every problem with its file and line. Exit 0 when usable, 1 on errors."""
    from cogtune import report
    from cogtune.config import load_config
    from cogtune.data.validate import print_report, validate_dataset
    from cogtune.errors import ModelError
    from cogtune.models.loading import load_tokenizer, resolve_model

    config = load_config(DatasetConfig, overrides={**overrides, "root": str(data_root)})
    spec = tokenizer = None
    if model is not None:
        resolved = resolve_model(model)
        spec = resolved.spec
        try:
            tokenizer = load_tokenizer(resolved, local_only=True)  # validation never downloads
        except ModelError:
            report.warn(f"caption token counts skipped: the tokenizer of {model} is not in the local cache "
                        f"(`cogtune encode` or `huggingface-cli download {resolved.location} --include 'tokenizer/*'`"
                        " fetches it)")
    result = validate_dataset(config, frames=frames, height=height, width=width, model=spec, tokenizer=tokenizer,
                              deep=deep)
    if json_output:
        report.stdout.print_json(json.dumps(result.as_json()))
    else:
        print_report(result)
        if result.ok:
            report.success(f"dataset usable: {result.items} items, {len(result.warnings)} warnings")
        else:
            report.error(f"{report.plural(len(result.errors), 'error')} in {Path(config.root)}")
    raise typer.Exit(0 if result.ok else 1)


@app.command(
    "download",
    epilog=examples(
        "cogtune dataset download Wild-Heart/Disney-VideoGeneration-Dataset --local-dir data/disney",
        "cogtune dataset download me/clips --local-dir data/clips --revision v1.0 --exclude 'raw/*'",
    ),
)
def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository id, e.g. Wild-Heart/Disney-VideoGeneration-Dataset.")],
    local_dir: Annotated[Path, typer.Option("--local-dir", help="Folder to download into.")],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit.")] = None,
    repo_type: Annotated[str, typer.Option("--repo-type", help="dataset, model or space.")] = "dataset",
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only files matching this glob.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Skip files matching this glob.")] = None,
    max_workers: Annotated[int, typer.Option("--max-workers", min=1, help="Files downloaded at once.")] = 8,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip checking the downloaded dataset.")] = False,
) -> None:
    """Download a dataset from the Hugging Face Hub, resumably, then validate it.

    Re-running the same command resumes: files already downloaded are skipped. The token comes from
    HF_TOKEN or `huggingface-cli login`; HF_ENDPOINT selects a mirror.
    """
    from cogtune.data.download import download_dataset

    download_dataset(repo_id, local_dir, repo_type=repo_type, revision=revision, include=include, exclude=exclude,
                     max_workers=max_workers, validate=not no_validate)
