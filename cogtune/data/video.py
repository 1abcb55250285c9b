"""Reading and writing video files: decord to read, imageio's ffmpeg to write mp4.

`probe_video` reads container metadata and the frame index only (no full decode), which is what
makes validating a large dataset fast; `read_frames` decodes just the frames asked for.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cogtune.errors import DataError
from cogtune.fsutil import atomic_path
from cogtune.quiet import debug_enabled, muted_native_stderr

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
        with muted_native_stderr():
            return decord.VideoReader(str(path), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError for every container problem
        text = str(exc)
        if "cannot find video stream" in text or ("stream" in text.lower() and "video" in text.lower()):
            raise VideoReadError(f"{path}: file has no video stream", "no-video-stream") from None
        raise VideoReadError(f"{path}: cannot decode video ({_decord_reason(text)})", "unreadable-video") from None


def _decord_reason(text: str) -> str:
    """The useful part of a decord error: ffmpeg's reason, without log prefixes or the path."""
    if text.strip().startswith("Error reading"):
        return "not a readable video container (truncated, corrupt or not a video)"
    match = re.search(r"ERROR (?:opening: [^,]*, )?(.*)$", text.strip())
    reason = match.group(1) if match else (text.strip().splitlines() or ["unknown error"])[-1]
    return reason.strip()[:160] or "unknown error"


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


def count_decodable_frames(path: str | Path, chunk: int = 32) -> int:
    """Decode every frame (in chunks, to bound memory); a decoding failure is an error."""
    reader = _open_reader(Path(path))
    total = len(reader)
    for start in range(0, total, chunk):
        try:
            reader.get_batch(list(range(start, min(start + chunk, total))))
        except Exception as exc:
            raise VideoReadError(f"{path}: frame {start} or after cannot be decoded ({str(exc)[:120]})",
                                 "unreadable-video") from None
    return total


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
