"""Bench results as a rich table, a markdown table laid out like the CogVideoX factory's memory tables, JSON, and a PNG chart."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cogtune import report
from cogtune.fsutil import atomic_path, atomic_write_text
from cogtune.train.memory import MOMENTS

BREAKDOWN_MOMENTS = ("before_training", "before_validation", "after_validation", "after_testing")


def row_values(row: dict[str, Any]) -> list[float]:
    memory = row["memory_gib"]
    return [memory["before_training"], memory["before_validation"], memory["after_validation"],
            memory["after_testing"]]


def optional_columns(rows: Sequence[dict[str, Any]], budget: float | None) -> list[tuple[str, Callable[[dict], Any]]]:
    """The columns after the four moments, the same in the table and the markdown: each one's title and
    how a row gives its cell (None: no figure). Host RAM where some configuration needs it (offloading),
    s/step where the rows have step times, whether each fits where a GPU size is given."""
    columns: list[tuple[str, Callable[[dict], Any]]] = []
    if any(row.get("host_ram_gib") for row in rows):
        columns.append(("host RAM", lambda row: row.get("host_ram_gib")))
    if any("seconds_per_step" in row for row in rows):
        columns.append(("s/step", lambda row: row.get("seconds_per_step")))
    if budget is not None:
        columns.append((f"fits {budget:g} GiB", _fit_text))
    return columns


def print_rows(rows: Sequence[dict[str, Any]], title: str, budget: float | None) -> None:
    extra = optional_columns(rows, budget)
    columns = ["configuration", "before training", "before validation", "after validation", "after testing",
               *(name for name, _ in extra)]
    table_rows = [[row["label"], *row_values(row), *(cell(row) for _, cell in extra)] for row in rows]
    report.table(title, columns, table_rows)
    for row in rows:
        if row.get("suggestion"):
            report.info(f"to fit {row['label']}: {row['suggestion']}")


def _fit_text(row: dict[str, Any]) -> str:
    if row.get("fits") is None:
        return "-"
    if not row["fits"] and row.get("host_fits") is False and row.get("gpu_fits"):
        return "no (host RAM)"
    return "yes" if row["fits"] else "no"


def part_label(part: str) -> str:
    return {"backward_transients": "backward temporaries (activation gradients)",
            "recomputed_activations": "recomputed block's activations", "reserved_after_peak": "reserved after the peak",
            "autocast_weight_copies": "autocast weight copies", "workspaces": "cuBLAS / attention workspaces",
            "validation_denoise": "validation denoising", "validation_decode": "validation VAE decode",
            "offloaded_blocks": "offloaded blocks (pinned)", "offloaded_activations": "offloaded activations (pinned)",
            "cpu_optimizer": "CPU optimizer params and grads (pinned)",
            "cpu_optimizer_state": "CPU optimizer state", "gathered_weights": "FSDP gathered weights (root, blocks in flight)",
            "gradient_buffers": "FSDP unsharded gradients, reduce-scatter"}.get(part, part.replace("_", " "))


def print_breakdowns(rows: Sequence[dict[str, Any]]) -> None:
    """One table per row: each moment's peak in its parts (GiB; the parts sum to the moment's figure)."""
    for row in rows:
        breakdown = row.get("breakdown_gib")
        if not breakdown:
            continue
        moments = [m for m in BREAKDOWN_MOMENTS if m in breakdown]
        parts = _ordered_parts([breakdown[moment] for moment in moments])
        table_rows: list[list[Any]] = [[part_label(p), *(breakdown[m].get(p, 0.0) for m in moments)] for p in parts]
        table_rows.append(["total", *(row["memory_gib"][m] for m in moments)])
        host = row.get("host_ram_breakdown_gib") or {}
        for part, value in host.items():
            if value:
                table_rows.append([f"host: {part_label(part)}", *([None] * (len(moments) - 1)), value])
        report.table(f"{row['label']}: parts (GiB)", ["part", *(m.replace("_", " ") for m in moments)], table_rows)


def markdown(rows: Sequence[dict[str, Any]], title: str, budget: float | None, notes: Sequence[str] = (),
             breakdown: bool = False) -> str:
    """The CogVideoX factory's memory-table layout: one row per configuration, the four moments in GiB; with
    `breakdown`, a second table of each configuration's peaks in their parts."""
    extra = optional_columns(rows, budget)
    header = ["model", "method", "rank", "optimizer", "gradient checkpointing", "options", "batch", "frames x H x W",
              *MOMENTS, *(name for name, _ in extra)]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        case = row["case"]
        base = case.get("base_weights", "fp8" if case["fp8"] else "bf16")  # rows written before int8 and nf4 say fp8
        options = ", ".join([f"{base} base"] * (base != "bf16") +
                            [name for name, key in (("offload blocks", "offload_blocks"),
                                                    ("offload activations", "offload_activations")) if case[key]]) or "-"
        shape = "x".join(str(v) for v in row["shape"])
        cells = [case["model"], case["method"], str(case["rank"]) if case["method"] == "lora" else "-",
                 case["optimizer"], "on" if case["gradient_checkpointing"] else "off", options, str(case["batch_size"]),
                 shape, *(f"{value:.2f}" for value in row_values(row)),
                 *(_markdown_cell(cell(row)) for _, cell in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    if breakdown:
        lines += ["", *_markdown_parts(rows)]
    lines += ["", *notes]
    return "\n".join(lines).rstrip() + "\n"


def _ordered_parts(breakdowns: Sequence[dict[str, float]]) -> list[str]:
    from cogtune.train.sizing.estimate import BREAKDOWN_PARTS

    present = {part for parts in breakdowns for part in parts}
    return [p for p in BREAKDOWN_PARTS if p in present] + sorted(present - set(BREAKDOWN_PARTS))


def _markdown_parts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The training peak (before validation) and the peak with validation (after testing) of each configuration,
    in their parts (GiB): what is allocated at the fullest instant, and the allocator's slack then."""
    moments = ("before_validation", "after_testing")
    with_parts = [row for row in rows if row.get("breakdown_gib")]
    names = _ordered_parts([row["breakdown_gib"][m] for row in with_parts for m in moments])
    header = ["configuration", "peak", *(part_label(name) for name in names), "total"]
    lines = ["#### Each peak in its parts (GiB)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in with_parts:
        for moment in moments:
            parts = row["breakdown_gib"][moment]
            cells = [row["label"], moment.replace("_", " "), *(f"{parts.get(name, 0.0):.3f}" for name in names),
                     f"{row['memory_gib'][moment]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _markdown_cell(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.2f}"


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def write_markdown(path: str | Path, text: str) -> Path:
    return atomic_write_text(path, text)


def write_chart(path: str | Path, rows: Sequence[dict[str, Any]], title: str, budget: float | None) -> Path:
    """Grouped bars (the four moments) per configuration, with a line at the GPU's budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in rows]
    values = np.array([row_values(row) for row in rows])
    width = 0.2
    positions = np.arange(len(rows))
    stacked = [row.get("breakdown_gib", {}).get("before_validation") for row in rows]
    with_parts = all(stacked)
    figure, axes = plt.subplots(1, 2 if with_parts else 1, figsize=(max(7.0, 1.2 * len(rows) + 3) * (2 if with_parts else 1),
                                                                  4.8), dpi=120, squeeze=False)
    axis = axes[0][0]
    if with_parts:
        _stacked_parts(axes[0][1], stacked, positions, labels, budget)
    for index, moment in enumerate(MOMENTS):
        axis.bar(positions + (index - 1.5) * width, values[:, index], width, label=moment.replace("memory_", ""))
    if budget is not None:
        axis.axhline(budget, color="crimson", linestyle="--", linewidth=1.5, label=f"budget {budget:g} GiB")
    axis.set_xticks(positions, [_wrap(label) for label in labels], fontsize=7)
    axis.set_ylabel("GiB (peak reserved)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)


def _stacked_parts(axis: Any, parts: Sequence[dict[str, float]], positions: Any, labels: Sequence[str],
                   budget: float | None) -> None:
    """The training peak (before validation) of each row, stacked by part."""
    names = _ordered_parts(parts)
    bottom = np.zeros(len(parts))
    for name in names:
        heights = np.array([row.get(name, 0.0) for row in parts])
        axis.bar(positions, heights, 0.6, bottom=bottom, label=part_label(name))
        bottom += heights
    if budget is not None:
        axis.axhline(budget, color="crimson", linestyle="--", linewidth=1.5)
    axis.set_xticks(positions, [_wrap(label) for label in labels], fontsize=7)
    axis.set_ylabel("GiB (training peak, reserved)")
    axis.set_title("the training peak in its parts", fontsize=10)
    axis.legend(fontsize=6)
    axis.grid(axis="y", alpha=0.3)


def _wrap(label: str, width: int = 22) -> str:
    words, lines, current = label.split(), [], ""
    for word in words:
        if current and len(current) + len(word) + 1 > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    lines.append(current)
    return "\n".join(lines)
