"""Synthetic clips of moving shapes, with captions that describe them, for the demo and tests.

Each clip is one coloured shape crossing a dark gradient in a given direction; the caption names
the colour, the shape and the direction, so a model has something learnable to fit.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from cogtune.data.video import write_video
from cogtune.fsutil import atomic_write_text

COLORS = {
    "red": (230, 50, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "magenta": (220, 50, 200),
}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def render_clip(shape: str, color: str, direction: str, frames: int, height: int, width: int) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 of `shape` moving across the frame towards `direction`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack(
        [18 + 30 * yy / max(height - 1, 1), 20 + 20 * xx / max(width - 1, 1), 40 + 30 * yy / max(height - 1, 1)],
        axis=-1,
    )
    radius = max(2.0, min(height, width) / 6)
    dx, dy = DIRECTIONS[direction]
    rgb = np.array(COLORS[color], dtype=np.float32)
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    for index in range(frames):
        progress = index / max(frames - 1, 1)
        # Start on one side and travel to the other, keeping the shape fully inside the frame.
        cx = width / 2 + dx * (progress - 0.5) * (width - 2 * radius - 2)
        cy = height / 2 + dy * (progress - 0.5) * (height - 2 * radius - 2)
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        frame = background.copy()
        frame[mask] = rgb
        clip[index] = frame.round().astype(np.uint8)
    return clip


def caption_for(shape: str, color: str, direction: str) -> str:
    return f"A {color} {shape} moves {direction} across a dark background."


def make_synthetic_dataset(
    root: str | Path,
    *,
    count: int = 6,
    frames: int = 17,
    height: int = 64,
    width: int = 64,
    fps: int = 8,
) -> Path:
    """Write `count` clips to `root/videos/` with `prompts.txt` and `videos.txt` beside them."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    captions, videos = [], []
    # Walk the combinations with a stride so that a handful of clips covers colours, shapes and directions.
    all_combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    combos = [all_combos[(i * 7) % len(all_combos)] for i in range(count)]
    for index, (color, shape, direction) in enumerate(combos):
        relative = f"videos/clip_{index:03d}.mp4"
        write_video(root / relative, render_clip(shape, color, direction, frames=frames, height=height, width=width), fps=fps)
        captions.append(caption_for(shape, color, direction))
        videos.append(relative)
    atomic_write_text(root / "prompts.txt", "\n".join(captions) + "\n")
    atomic_write_text(root / "videos.txt", "\n".join(videos) + "\n")
    return root
