"""Small helpers shared by the command modules (no heavy imports here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXAMPLES_TITLE = "[bold]Examples[/bold]"


def examples(*lines: str) -> str:
    """An epilog of runnable examples for `--help` (rich markup; one command per line)."""
    body = "\n\n".join(f"  $ {line}" for line in lines)
    return f"{EXAMPLES_TITLE}\n\n{body}"


def dataset_overrides(
    root: Path | None,
    caption_column: str | None = None,
    video_column: str | None = None,
    image_column: str | None = None,
    dataset_file: str | None = None,
    allow_outside_root: bool = False,
    id_token: str | None = None,
    frame_sampling: str | None = None,
    sample_fps: float | None = None,
    resize_mode: str | None = None,
    prefix: str = "data.",
) -> dict[str, Any]:
    """Dotted config overrides for the dataset options every data-reading command shares."""
    return {
        f"{prefix}root": str(root) if root is not None else None,
        f"{prefix}caption_column": caption_column,
        f"{prefix}video_column": video_column,
        f"{prefix}image_column": image_column,
        f"{prefix}dataset_file": dataset_file,
        f"{prefix}allow_outside_root": True if allow_outside_root else None,
        f"{prefix}id_token": id_token,
        f"{prefix}frame_sampling": frame_sampling,
        f"{prefix}sample_fps": sample_fps,
        f"{prefix}resize_mode": resize_mode,
    }


def as_tuple(values: list[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values else None
