"""Small helpers shared by the command modules (no heavy imports here)."""

from __future__ import annotations

EXAMPLES_TITLE = "Examples:"


def examples(*lines: str) -> str:
    """An epilog of runnable examples for `--help`, one command per line, printed as written.

    (`\\b` keeps click from rewrapping a paragraph, so each command stays one copyable line.)
    """
    body = "\n".join(f"  $ {line}" for line in lines)
    return f"{EXAMPLES_TITLE}\n\n\b\n{body}"
