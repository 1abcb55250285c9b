"""Reading and writing video files: decord to read (imageio's ffmpeg where decord cannot), imageio's ffmpeg to write mp4.

`probe_video` reads container metadata and the frame index and decodes the first and last frames
only (no full decode), which is what makes validating a large dataset fast while still catching
files cut short; `read_frames` decodes just the frames asked for. AV1, animated GIFs, the frame
sizes decord mis-reads, clips of more than 8 bits per sample and files with several video streams
go through imageio-ffmpeg's ffmpeg binary (`cogtune.data.ffprobe`), whose decode is the reference:
what ffmpeg shows (its stream choice, rotation and RGB conversion) is what cogtune trains on.
Stills are read as viewers show them (`read_image`: EXIF orientation applied, 16-bit grey scaled).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from cogtune.data import ffprobe
from cogtune.errors import DataError, StorageError
from cogtune.fsutil import atomic_path
from cogtune.quiet import debug_enabled, muted_native_stderr


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int  # as displayed (rotation applied), in stored pixels
    height: int
    sar: float = 1.0  # sample aspect ratio: stored pixels are `sar` times as wide as tall (anamorphic video)
    codec: str | None = None
    # How frames are read: "decord"; "ffmpeg" for what decord cannot read or reads differently from ffmpeg
    # (AV1, GIF, some frame sizes, more than 8 bits per sample, several video streams); "image" for a still.
    backend: str = "decord"
    timestamps: tuple[float, ...] | None = None  # each frame's time (s), kept for variable-frame-rate clips only

    @property
    def duration(self) -> float:
        if self.timestamps and len(self.timestamps) > 1:
            return self.timestamps[-1] - self.timestamps[0] + (1.0 / self.fps if self.fps > 0 else 0.0)
        return self.frames / self.fps if self.fps > 0 else 0.0

    @property
    def display_width(self) -> int:
        """The width the picture is meant to be shown at (stored width times the sample aspect ratio)."""
        return max(1, round(self.width * self.sar))

    @property
    def aspect(self) -> float:
        return self.width * self.sar / self.height


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


def _check_file(path: Path) -> None:
    """The problems found without reading the video: missing, a folder, unreadable, empty."""
    if not path.exists():
        raise VideoReadError(f"{path}: file not found" + (" (a dangling symlink)" if path.is_symlink() else ""),
                             "missing-file")
    if path.is_dir():
        raise VideoReadError(f"{path}: is a folder, not a video file", "not-a-file")
    if not path.is_file():
        raise VideoReadError(f"{path}: is not a regular file", "not-a-file")
    if not os.access(path, os.R_OK):
        raise VideoReadError(f"{path}: permission denied: the file cannot be read (check its permissions)",
                             "permission-denied")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError as exc:
        raise VideoReadError(f"{path}: permission denied: the file cannot be read (check its permissions)",
                             "permission-denied") from exc
    except OSError as exc:
        raise VideoReadError(f"{path}: the file cannot be read ({exc.strerror or 'I/O error'})",
                             "unreadable-video") from exc
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes)", "empty-video")


def _decord_failure(path: Path, text: str, codec: str | None = None) -> VideoReadError:
    """A one-line error for what decord raised: no `Check failed`, build paths or ffmpeg error numbers."""
    lowered = text.lower()
    if "permission denied" in lowered:
        return VideoReadError(f"{path}: permission denied: the file cannot be read (check its permissions)",
                              "permission-denied")
    if "cannot find video stream" in lowered:
        if codec:
            return VideoReadError(f"{path}: cannot decode its '{codec}' video stream (no decoder for it)",
                                  "unreadable-video")
        return VideoReadError(f"{path}: file has no video stream", "no-video-stream")
    if "av_read_frame" in lowered:
        reason = "reading it fails partway (the file is truncated or damaged)"
    elif "broken metadata" in lowered:
        reason = "its duration and frame count cannot be measured (broken metadata)"
    elif "size must exactly match" in lowered:
        reason = "decord mis-reads frames of this size"
    else:
        reason = "not a readable video container (truncated, corrupt or not a video)"
    if codec:
        reason += f"; codec '{codec}'"
    return VideoReadError(f"{path}: cannot decode video ({reason}){_debug_detail(text)}", "unreadable-video")


def _debug_detail(text: str) -> str:
    """The decoder's own words, with --debug only."""
    if not debug_enabled():
        return ""
    return f" [decoder: {' '.join(text.split())[:240]}]"


def _open_reader(path: Path, codec: str | None = None):
    decord = _decord()
    try:
        with muted_native_stderr():
            return decord.VideoReader(str(path), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError (or RuntimeError) for every container problem
        raise _decord_failure(path, str(exc), codec) from exc


def _stream_info(path: Path) -> tuple[ffprobe.StreamInfo | None, ffprobe.FfmpegFailure | None]:
    if not ffprobe.available():
        return None, None
    try:
        return ffprobe.stream_info(path), None
    except ffprobe.FfmpegFailure as failure:
        return None, failure


def _variable_rate(timestamps: Sequence[float]) -> bool:
    """Whether frame intervals vary by more than timestamp rounding does."""
    if len(timestamps) < 3:
        return False
    intervals = np.diff(np.asarray(timestamps, dtype=float))
    mean = float(intervals.mean())
    return mean > 0 and float(np.abs(intervals - mean).max()) > 0.25 * mean


def stream_headers(paths: Sequence[str | Path]) -> list[ffprobe.StreamInfo | ffprobe.FfmpegFailure | None]:
    """What the files' container headers say (one ffmpeg run for all of them), for `probe_video(header=...)`."""
    if not ffprobe.available():
        return [None] * len(paths)
    try:
        return list(ffprobe.stream_headers(paths))
    except ffprobe.FfmpegFailure as failure:  # ffmpeg itself failed (timed out): each file is probed alone
        return [None] * len(paths) if len(paths) > 1 else [failure]


def probe_video(path: str | Path, header: ffprobe.StreamInfo | ffprobe.FfmpegFailure | None = None) -> VideoInfo:
    """Frame count, fps, size, sample aspect ratio and (VFR) timestamps, decoding two frames.

    The first and the last frame are decoded, so files cut short (an interrupted download) are
    caught here rather than halfway through an encode. Clips decord cannot read (AV1, GIF) or
    mis-reads (some frame sizes) are read with imageio-ffmpeg's ffmpeg instead, and so are those it
    reads differently from ffmpeg: more than 8 bits per sample, several video streams. `header` is
    the file's entry of `stream_headers` (validation reads many headers in one ffmpeg run).
    """
    path = Path(path)
    _check_file(path)
    if header is None:
        header = stream_headers([path])[0]
    if isinstance(header, ffprobe.FfmpegFailure) and header.code == "no-video-stream":
        raise VideoReadError(f"{path}: {header.reason}", header.code)  # e.g. audio only, or audio with cover art
    stream = header if isinstance(header, ffprobe.StreamInfo) else None
    if stream is not None and stream.video_streams > 1:
        # decord picks a stream its own way; the one ffmpeg picks (as players do) is read with ffmpeg
        return _probe_ffmpeg(path, _packets(path))
    try:
        info = _probe_decord(path, stream)
    except VideoReadError as exc:
        full, failure = _stream_info(path)
        if full is None:
            if failure is not None:
                raise VideoReadError(f"{path}: {failure.reason}", failure.code) from exc
            raise
        return _probe_ffmpeg(path, full)
    if stream is not None and stream.high_bit_depth:
        # decord's own conversion of 10-bit 4:2:0 to RGB is up to 200 levels off ffmpeg's at colour edges:
        # its probe stands, the frames are read with ffmpeg.
        return dataclasses.replace(info, backend="ffmpeg")
    return info


def _packets(path: Path) -> ffprobe.StreamInfo:
    try:
        return ffprobe.stream_info(path)
    except ffprobe.FfmpegFailure as failure:
        raise VideoReadError(f"{path}: {failure.reason}", failure.code) from failure


def _probe_decord(path: Path, stream: ffprobe.StreamInfo | None) -> VideoInfo:
    reader = _open_reader(path, stream.codec if stream else None)
    frames = len(reader)
    if frames == 0:
        raise VideoReadError(f"{path}: video has no frames", "unreadable-video")
    try:
        with muted_native_stderr():
            first = reader[0].asnumpy()
            last = reader[frames - 1].asnumpy() if frames > 1 else first
    except Exception as exc:  # the last frame fails: cut short, or one of decord's bugs (ffmpeg is tried next)
        raise _decord_failure(path, str(exc)) from exc
    expected = (stream.height, stream.width) if stream is not None else first.shape[:2]
    for frame in (first, last):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[:2] != tuple(expected):
            raise VideoReadError(f"{path}: decord mis-reads frames of this size", "unreadable-video")
    fps = float(reader.get_avg_fps())
    fps = fps if math.isfinite(fps) and fps > 0 else (stream.fps if stream else 0.0)
    try:
        stamps = [float(t) for t in reader.get_frame_timestamp(list(range(frames)))[:, 0]]
    except Exception:
        stamps = list(stream.timestamps) if stream is not None else []
    return VideoInfo(frames=frames, fps=fps, width=int(first.shape[1]), height=int(first.shape[0]),
                     sar=stream.sar if stream else 1.0, codec=stream.codec if stream else None, backend="decord",
                     timestamps=tuple(stamps) if _variable_rate(stamps) else None)


def _probe_ffmpeg(path: Path, stream: ffprobe.StreamInfo) -> VideoInfo:
    frames = len(stream.timestamps)
    try:
        ffprobe.decode(path, [0], stream)
    except ffprobe.FfmpegFailure as failure:
        raise VideoReadError(f"{path}: cannot decode its '{stream.codec}' video stream ({failure.reason})",
                             failure.code) from failure
    # A full decode, into checksums only: seeking near the end is unreliable across containers, and
    # clips that need ffmpeg (AV1, GIF) are few.
    decoded = ffprobe.decoded_frame_count(path)
    if decoded < frames:
        raise VideoReadError(f"{path}: the file ends early: only {decoded} of its {frames} frames can be decoded "
                             "(truncated, e.g. an interrupted download)", "unreadable-video")
    return VideoInfo(frames=frames, fps=stream.fps, width=stream.width, height=stream.height, sar=stream.sar,
                     codec=stream.codec, backend="ffmpeg",
                     timestamps=stream.timestamps if _variable_rate(stream.timestamps) else None)


# EXIF orientations that turn the picture a quarter turn (its width and height swap when shown).
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def probe_image(path: str | Path) -> VideoInfo:
    """A still image as a one-frame clip (`backend="image"`): its size as shown (EXIF orientation applied)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
            image.load()  # decodes the pixels: a truncated file fails here, not halfway through an encode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VideoReadError(f"{path}: image cannot be read ({_first_line(exc)})", "unreadable-image") from exc
    return VideoInfo(frames=1, fps=0.0, width=width, height=height, backend="image")


def displayed_image(image):
    """A PIL image as viewers show it, in RGB: EXIF orientation applied (phone photos are stored sideways),
    16-bit greyscale scaled to 8 bits (PIL's own conversion clips it to white), palette and alpha dropped."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def read_image(path: str | Path) -> np.ndarray:
    """A still image as uint8 RGB (H, W, 3), as viewers show it (see `displayed_image`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(displayed_image(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VideoReadError(f"{path}: image cannot be read ({_first_line(exc)})", "unreadable-image") from exc


def read_frames(path: str | Path, indices: Sequence[int], info: VideoInfo | None = None) -> np.ndarray:
    """Decode the frames at `indices` as uint8 RGB, shape (F, H, W, 3).

    With decord, unless `info` says the clip needs ffmpeg; when decord fails or returns frames
    of the wrong shape, ffmpeg is tried before giving up.
    """
    path = Path(path)
    indices = [int(i) for i in indices]
    if info is None or info.backend == "decord":
        try:
            reader = _open_reader(path)
            with muted_native_stderr():
                frames = reader.get_batch(indices).asnumpy()
            expected = (info.height, info.width) if info is not None else frames.shape[1:3]
            if frames.ndim == 4 and frames.shape[3] == 3 and frames.shape[1:3] == tuple(expected):
                return frames
            failure: VideoReadError = VideoReadError(f"{path}: decord mis-reads frames of this size",
                                                     "unreadable-video")
        except VideoReadError as exc:
            failure = exc
        except Exception as exc:
            failure = _decord_failure(path, str(exc), info.codec if info else None)
        if not ffprobe.available():
            raise failure
    _check_file(path)
    try:
        stream = ffprobe.stream_info(path)
        return ffprobe.decode(path, indices, stream)
    except ffprobe.FfmpegFailure as exc:
        raise VideoReadError(f"{path}: cannot decode frames ({exc.reason})", exc.code) from exc


def count_decodable_frames(path: str | Path, chunk: int = 32, info: VideoInfo | None = None) -> int:
    """Decode every frame (in chunks, to bound memory); a decoding failure is an error."""
    path = Path(path)
    if info is not None and info.backend == "ffmpeg":
        decoded = ffprobe.decoded_frame_count(path)
        if decoded < info.frames:
            raise VideoReadError(f"{path}: only {decoded} of its {info.frames} frames can be decoded "
                                 "(the file is truncated or damaged)", "unreadable-video")
        return info.frames
    reader = _open_reader(path)
    total = len(reader)
    for start in range(0, total, chunk):
        try:
            with muted_native_stderr():
                reader.get_batch(list(range(start, min(start + chunk, total))))
        except Exception as exc:
            raise VideoReadError(f"{path}: frame {start} or after cannot be decoded (the file is damaged)",
                                 "unreadable-video") from exc
    return total


def read_all_frames(path: str | Path) -> np.ndarray:
    info = probe_video(path)
    return read_frames(path, range(info.frames), info)


def write_video(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float) -> Path:
    """Write uint8 RGB frames (F, H, W, 3) as H.264 mp4, atomically.

    ffmpeg writes the file in a subprocess whose failure imageio does not report (a full disk
    leaves a truncated, undecodable mp4), so the written file must open with every frame, the last
    one decodable, before it replaces `path`. A full disk is a `StorageError` naming `path`.
    """
    from cogtune.fsutil import disk_full_error, is_disk_full

    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        # ffmpeg picks the container from the extension, so the temporary name keeps it.
        tmp_video = tmp.with_name(tmp.name + path.suffix)
        try:
            try:
                with muted_native_stderr():  # ffmpeg's own messages: the failure is reported below
                    writer = imageio.get_writer(
                        str(tmp_video), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                        ffmpeg_log_level="error", pixelformat="yuv420p" if _even(frames) else "yuv444p",
                    )
                    with writer:
                        for frame in frames:
                            writer.append_data(frame)
            except OSError as exc:  # ffmpeg quit early and the pipe to it broke
                if is_disk_full(exc, path.parent):
                    raise disk_full_error(path) from exc
                raise StorageError(f"ffmpeg could not write {path}: {_first_line(exc)}") from exc
            _check_written(tmp_video, path, len(frames))
            tmp_video.replace(tmp)
        finally:
            tmp_video.unlink(missing_ok=True)
    return path


def _check_written(written: Path, path: Path, expected: int) -> None:
    """The mp4 ffmpeg wrote opens, holds `expected` frames, and its last frame decodes."""
    from cogtune.fsutil import LOW_SPACE_BYTES, disk_full_error, free_bytes

    problem = None
    try:
        count = len(_open_reader(written)) if written.is_file() else 0
        if count != expected:
            problem = f"{count} of {expected} frames written"
        else:
            read_frames(written, [count - 1])
    except VideoReadError as exc:
        problem = exc.message.replace(str(written), "the file").removeprefix("the file: ")
    if problem is None:
        return
    free = free_bytes(path.parent)
    if free is not None and free < LOW_SPACE_BYTES:
        raise disk_full_error(path)
    raise StorageError(f"ffmpeg did not write {path} completely ({problem})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "unknown error"


def _even(frames: np.ndarray) -> bool:
    return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
