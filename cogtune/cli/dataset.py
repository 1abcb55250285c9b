"""`cogtune dataset validate`, `download`, `prepare` (raw footage to clips) and `preview` (a cache decoded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import FramesOpt, HeightOpt, OptionalModelOpt, WidthOpt, completes
from cogtune.cli.settings import Overrides, settings_options
from cogtune.data.dataset import DatasetConfig
from cogtune.data.prepare import PrepareConfig

app = typer.Typer(help="Check datasets before training, fetch them from the Hub, cut raw footage into clips, and "
                       "preview what a cache trains on.", no_args_is_help=True)


@app.command(
    "validate",
    epilog=examples(
        "cogtune dataset validate data/ --frames 49 --height 480 --width 720 --model cogvideox-5b",
        "cogtune dataset validate data/ --json > report.json",
        "cogtune dataset validate data/ --dataset-file metadata.csv --caption-column text --video-column file",
        "cogtune dataset validate --dataset-config datasets.toml --model cogvideox-5b",
    ),
)
@settings_options(DatasetConfig, exclude=("root", "resize_mode"))  # the root is an argument; no resizing here
def validate(
    data_root: Annotated[Optional[Path], typer.Argument(help="Dataset root folder (or --dataset-config).",
                                                        metavar="DATA_ROOT", show_default=False)] = None,
    overrides: Overrides = None,
    dataset_config: Annotated[Optional[Path], typer.Option(
        "--dataset-config", metavar="FILE.toml", help="Check every [[datasets]] of a dataset config instead.")] = None,
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
    from cogtune.errors import ConfigError, ModelError

    if (data_root is None) == (dataset_config is None):
        raise ConfigError("give a DATA_ROOT or --dataset-config FILE.toml (one of the two)")
    config = load_config(DatasetConfig, overrides={**overrides, "root": str(data_root or "")})
    spec = tokenizer = None
    if model is not None:
        from cogtune.models.loading import load_tokenizer, resolve_model  # loads torch: only with --model

        resolved = resolve_model(model)
        spec = resolved.spec
        try:
            tokenizer = load_tokenizer(resolved, local_only=True)  # validation never downloads
        except ModelError:
            report.warn(f"caption token counts skipped: the tokenizer of {model} is not in the local cache "
                        f"(`cogtune encode` or `hf download {resolved.location} --include 'tokenizer/*'`"
                        " fetches it)")
    if dataset_config is not None:
        _validate_dataset_config(dataset_config, config, frames, height, width, spec, tokenizer, deep, json_output)
    result = validate_dataset(config, frames=frames, height=height, width=width, model=spec, tokenizer=tokenizer,
                              deep=deep, i2v=spec is not None and spec.is_i2v)
    if json_output:
        report.stdout.print_json(json.dumps(result.as_json()))
    else:
        print_report(result)
        if result.ok:
            report.success(f"dataset usable: {result.items} items, {len(result.warnings)} warnings")
        else:
            report.error(f"{report.plural(len(result.errors), 'error')} in {Path(config.root)}")
    raise typer.Exit(0 if result.ok else 1)


def _validate_dataset_config(path: Path, defaults: DatasetConfig, frames: int | None, height: int | None,
                             width: int | None, spec: object, tokenizer: object, deep: bool, json_output: bool) -> None:
    """`dataset validate --dataset-config`: one report per [[datasets]]; exits 0 when all are usable."""
    from cogtune import report
    from rich.markup import escape

    from cogtune.data.validate import print_report, validate_dataset_config

    results = validate_dataset_config(path, defaults, frames=frames, height=height, width=width, model=spec,
                                      tokenizer=tokenizer, deep=deep, i2v=bool(getattr(spec, "is_i2v", False)))
    ok = all(result.ok for _, result in results)
    if json_output:
        datasets = [{"name": source.name, "repeats": source.repeats, **result.as_json()} for source, result in results]
        report.stdout.print_json(json.dumps({"ok": ok, "datasets": datasets}))
    else:
        for source, result in results:
            report.stdout.rule(escape(f"dataset '{source.name}' ({source.origin}, repeats {source.repeats})"))
            print_report(result)
        items = sum(result.items for _, result in results)
        errors = sum(len(result.errors) for _, result in results)
        if ok:
            report.success(f"datasets usable: {len(results)} datasets, {items} entries")
        else:
            report.error(f"{report.plural(errors, 'error')} in {path}")
    raise typer.Exit(0 if ok else 1)


def _repo_types() -> tuple[str, ...]:
    from cogtune.data.download import REPO_TYPES

    return REPO_TYPES


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
    repo_type: Annotated[
        str, typer.Option("--repo-type", help="dataset, model or space.", autocompletion=completes(_repo_types))
    ] = "dataset",
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only files matching this glob.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Skip files matching this glob.")] = None,
    max_workers: Annotated[int, typer.Option("--max-workers", min=1, help="Files downloaded at once.")] = 8,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip checking the downloaded dataset.")] = False,
) -> None:
    """Download a dataset from the Hugging Face Hub, resumably, then validate it.

    Re-running the same command resumes: files already downloaded are skipped. The token comes from
    HF_TOKEN or `hf auth login`; HF_ENDPOINT selects a mirror.
    """
    from cogtune.data.download import download_dataset

    download_dataset(repo_id, local_dir, repo_type=repo_type, revision=revision, include=include, exclude=exclude,
                     max_workers=max_workers, validate=not no_validate)


@app.command(
    "prepare",
    epilog=examples(
        "cogtune dataset prepare footage/ data/shots --model cogvideox-5b",
        "cogtune dataset prepare footage/ data/shots --model cogvideox1.5-5b --caption-model models/my-vlm",
        "cogtune dataset prepare footage/ data/shots --frames 49 --fps 8 --detector content --threshold 20",
    ),
)
@settings_options(PrepareConfig)  # raw and output are the arguments
def prepare(
    raw_dir: Annotated[Path, typer.Argument(help="Folder of raw footage (searched recursively).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Dataset folder to write (new, or an earlier prepare's to resume).",
                                            show_default=False)],
    overrides: Overrides = None,
) -> None:
    """Cut raw footage into shot-detected clips of the model's frame count, with videos.txt and prompts.txt.

    Shots are found with PySceneDetect; each becomes back-to-back clips of exactly the model's frame count
    at its fps (shorter shots are skipped and counted). Captions come from a `<video>.txt` beside each
    source, else --caption-model, else a placeholder that `dataset validate` flags. Re-running resumes;
    nothing is overwritten. prepare.json and report.txt say what was kept and why.
    """
    from cogtune.config import load_config
    from cogtune.data.prepare import prepare_dataset

    prepare_dataset(load_config(PrepareConfig, overrides={**overrides, "raw": str(raw_dir), "output": str(out_dir)}))


@app.command(
    "preview",
    epilog=examples(
        "cogtune dataset preview cache/disney",
        "cogtune dataset preview cache/disney --count 4 --output previews/ --model path/to/CogVideoX-5b",
    ),
)
def preview(
    cache: Annotated[Path, typer.Argument(help="Latent cache folder (made by `cogtune encode`).", show_default=False)],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Items decoded per bucket.")] = 2,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for the previews; default: "
                                                                          "CACHE/preview.")] = None,
    model: OptionalModelOpt = None,
) -> None:
    """Decode cached latents with the VAE back to mp4, and a PNG contact sheet per bucket.

    Shows what training sees: the crop, the bucket and the frames sampled. The VAE is the model the
    cache records (`--model` names another copy of it, e.g. a local folder).
    """
    from cogtune.encode.preview import preview_cache

    preview_cache(cache, count=count, output=output, model=model)
