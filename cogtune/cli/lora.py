"""`cogtune lora inspect`, `cogtune lora convert` and `cogtune lora merge`: a LoRA for other tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import completes
from cogtune.config import MODEL_HELP

app = typer.Typer(help="Inspect LoRAs, convert them between the diffusers, ComfyUI, kohya and SAT layouts, merge them.",
                  no_args_is_help=True)

# The layouts, repeated here so that `--help` imports nothing heavy; cogtune.lora.layouts checks them.
WRITTEN = ("diffusers", "comfyui", "kohya", "sat")
READ = ("auto", *WRITTEN)


@app.command(
    "inspect",
    epilog=examples(
        "cogtune lora inspect runs/disney",
        "cogtune lora inspect my_lora.safetensors --json > lora.json",
    ),
)
def inspect(
    file_or_run: Annotated[Path, typer.Argument(help="A LoRA .safetensors file, or a run folder.", metavar="FILE_OR_RUN",
                                                show_default=False)],
    from_layout: Annotated[str, typer.Option("--from", help=f"Layout of the file: {', '.join(READ)}.",
                                             autocompletion=completes(READ))] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    model: Annotated[str | None, typer.Option("--model", help="The base model, for each layer's relative update "
                                                             "(default: the one the LoRA records, if on this machine).",
                                              metavar="MODEL", show_default=False)] = None,
) -> None:
    """Layout, model family, rank and alpha per layer (and how alpha is stored), targets, buckets, and how much
    each layer's update changes its base weight."""
    from cogtune import report
    from cogtune.lora.layouts import inspect_lora
    from cogtune.lora.strength import inspect_updates

    result = inspect_lora(file_or_run, from_layout)
    result["updates"] = inspect_updates(file_or_run, from_layout, model)
    if result["updates"]["all_b_zero"]:
        report.warn("every B matrix of this LoRA is zero: it changes nothing (trained with lr 0, or saved before "
                    "its first step)")
    if json_output:
        report.stdout.print_json(json.dumps(result))
        return
    fits = ", ".join(result["fits"]) or "no known model (shapes match no preset)"
    report.key_values(str(result["file"]), [
        ("layout", result["layout"]),
        ("loads in", result["loads_in"]),
        ("trained for", f"{result['model']} ({result['family']})" if result["model"] else f"fits {fits}"),
        ("layers", result["layers"]),
        ("alpha", result["alpha_form_text"]),
        ("alpha works everywhere", "yes" if result["alpha_portable"] else
         "no: convert it (`cogtune lora convert IN OUT --to diffusers`) for loaders older than diffusers 0.34"),
        ("targets", ", ".join(result["target_modules"])),
        ("buckets", ", ".join(result["buckets"]) if result["buckets"] else None),
        ("base", result.get("trained_against")),
    ])
    report.table("rank and alpha", ["rank", "alpha", "scale", "layers"],
                 [(g["rank"], g["alpha"], g["alpha"] / g["rank"], g["layers"]) for g in result["ranks_alphas"]])
    settings = {k: v for k, v in result["cogtune"].items() if k not in ("buckets", "model", "family")}
    if settings:
        report.key_values("recorded by cogtune", sorted(settings.items()))
    _print_updates(result["updates"])


def _print_updates(updates: dict) -> None:
    """Each layer's update ||scale B A||, and relative to its base weight when the base is on this machine."""
    from cogtune import report

    layers = updates["layers"]
    if updates["base"] is not None:
        report.table(f"update per layer, relative to {updates['base']}", ["layer", "||scale B A||", "||W||", "relative"],
                     [(row["module"], f"{row['update_norm']:.3g}", f"{row['weight_norm']:.3g}",
                       f"{row['relative']:.3g}" if row["relative"] is not None else "-") for row in layers])
        return
    report.table("update per layer", ["layer", "||scale B A||"], [(row["module"], f"{row['update_norm']:.3g}")
                                                                  for row in layers])
    report.info(f"no relative update: {updates['base_note']}")


@app.command(
    "convert",
    epilog=examples(
        "cogtune lora convert runs/disney disney_comfyui.safetensors --to comfyui",
        "cogtune lora convert videox_fun_lora.safetensors lora_diffusers.safetensors --to diffusers",
        "cogtune lora convert sat_lora.safetensors lora_kohya.safetensors --from sat --to kohya",
    ),
)
def convert(
    source: Annotated[Path, typer.Argument(help="The LoRA to convert (a file, or a run folder).", metavar="IN",
                                           show_default=False)],
    target: Annotated[Path, typer.Argument(help="The .safetensors file to write.", metavar="OUT", show_default=False)],
    to: Annotated[str, typer.Option("--to", help=f"Layout to write: {', '.join(WRITTEN)}.",
                                    autocompletion=completes(WRITTEN), show_default=False)],
    from_layout: Annotated[str, typer.Option("--from", help=f"Layout of IN: {', '.join(READ)}.",
                                             autocompletion=completes(READ))] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Rewrite a LoRA in another key layout, at the same strength (alpha carried or folded in)."""
    from cogtune import report
    from cogtune.errors import ConfigError
    from cogtune.lora.layouts import LOADS_IN, convert_lora

    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it")
    lora = convert_lora(source, target, to, from_layout)
    report.success(f"wrote {target}: {report.plural(len(lora.layers), 'layer')}, {lora.layout} -> {to}; "
                   f"loads in {LOADS_IN[to]}")


@app.command(
    "merge",
    epilog=examples(
        "cogtune lora merge --model THUDM/CogVideoX-5b --lora runs/disney --output disney-5b-transformer",
        "cogtune sample --model THUDM/CogVideoX-5b --transformer disney-5b-transformer "
        "--prompt 'A panda playing a guitar in a bamboo forest' -o panda.mp4",
    ),
)
def merge(
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP, metavar="MODEL", show_default=False)],
    lora: Annotated[Path, typer.Option("--lora", help="The LoRA (any layout), or its run folder.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the merged transformer.",
                                         show_default=False)],
    scale: Annotated[float, typer.Option("--scale", help="Strength the LoRA is folded in at.")] = 1.0,
) -> None:
    """Fold a LoRA into the model's transformer: a diffusers folder in the model's dtype (from_pretrained loads it)."""
    from cogtune import report, startup
    from cogtune.lora.merge import merge_lora

    startup.load_libraries()
    folder = merge_lora(model, lora, output, scale)
    report.success(f"wrote {folder}: the LoRA folded into {model}'s unquantized transformer, in its own dtype "
                   f"(load with CogVideoXTransformer3DModel.from_pretrained, or `cogtune sample --transformer {folder}`)")
