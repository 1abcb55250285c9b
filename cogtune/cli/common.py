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
    caption_column: str | None,
    video_column: str | None,
    image_column: str | None,
    allow_outside_root: bool,
    id_token: str | None,
    prefix: str = "data.",
) -> dict[str, Any]:
    """Dotted config overrides for the dataset options every data-reading command shares."""
    return {
        f"{prefix}root": str(root) if root is not None else None,
        f"{prefix}caption_column": caption_column,
        f"{prefix}video_column": video_column,
        f"{prefix}image_column": image_column,
        f"{prefix}allow_outside_root": True if allow_outside_root else None,
        f"{prefix}id_token": id_token,
    }


def as_tuple(values: list[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values else None
