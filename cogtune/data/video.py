"""Reading and writing video files: decord to read, imageio's ffmpeg to write mp4.

`probe_video` reads container metadata and the frame index only (no full decode), which is what
makes validating a large dataset fast; `read_frames` decodes just the frames asked for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cogtune.errors import DataError
from cogtune.fsutil import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


class VideoReadError(DataError):
    """A video file exists but cannot be decoded (corrupt, empty, or no video stream)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


_decord_quieted = False


def _decord():
    """decord, with ffmpeg's own stderr messages silenced (we report problems ourselves)."""
    global _decord_quieted
    import decord

    if not _decord_quieted:
        from cogtune.models.quiet import debug_enabled

        if not debug_enabled():
            decord.logging.set_level(decord.logging.QUIET)
        _decord_quieted = True
    return decord


def _open_reader(path: Path):
    decord = _decord()

    if not path.is_file():
        raise VideoReadError(f"{path}: file not found", "missing-file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes)", "empty-video")
    try:
        return decord.VideoReader(str(path), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError for every container problem
        text = str(exc).lower()
        code = "no-video-stream" if "stream" in text and "video" in text else "unreadable-video"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VideoReadError(f"{path}: cannot decode video ({first[:160]})", code) from None


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, fps and size from the container, without decoding the frames."""
    reader = _open_reader(Path(path))
    frames = len(reader)
    if frames == 0:
        raise VideoReadError(f"{path}: video has no frames", "unreadable-video")
    height, width = _first_frame_size(path, reader)
    fps = float(reader.get_avg_fps())
    return VideoInfo(frames=frames, fps=fps if math.isfinite(fps) else 0.0, width=width, height=height)


def _first_frame_size(path: str | Path, reader) -> tuple[int, int]:
    # decord exposes the size only through a decoded frame; decoding the first one is cheap and
    # also catches streams whose codec cannot actually be decoded.
    try:
        frame = reader[0]
    except Exception as exc:
        raise VideoReadError(f"{path}: cannot decode the first frame ({str(exc)[:160]})", "unreadable-video") from None
    return int(frame.shape[0]), int(frame.shape[1])


def read_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` as uint8 RGB, shape (F, H, W, 3)."""
    reader = _open_reader(Path(path))
    try:
        return reader.get_batch(list(indices)).asnumpy()
    except Exception as exc:
        raise VideoReadError(f"{path}: cannot decode frames ({str(exc)[:160]})", "unreadable-video") from None


def read_all_frames(path: str | Path) -> np.ndarray:
    reader = _open_reader(Path(path))
    return read_frames(path, range(len(reader)))


def write_video(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float) -> Path:
    """Write uint8 RGB frames (F, H, W, 3) as H.264 mp4, atomically."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        # ffmpeg picks the container from the extension, so the temporary name keeps it.
        tmp_video = tmp.with_name(tmp.name + path.suffix)
        try:
            writer = imageio.get_writer(
                str(tmp_video), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                ffmpeg_log_level="error", pixelformat="yuv420p" if _even(frames) else "yuv444p",
            )
            with writer:
                for frame in frames:
                    writer.append_data(frame)
            tmp_video.replace(tmp)
        finally:
            tmp_video.unlink(missing_ok=True)
    return path


def _even(frames: np.ndarray) -> bool:
    return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
