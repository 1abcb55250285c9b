"""The clip loader: frames sampled, resized and cropped exactly as the model needs them.

A `Bucket` is a clip shape `FxHxW`. Each clip goes to the bucket nearest its aspect ratio with the
most frames it can fill. Its frames are sampled to the bucket's count either uniformly over the
whole clip (`uniform`), or at a target frame rate from the middle of the clip (`fps`, which keeps
motion at the speed the model was trained on; variable-frame-rate clips are sampled by their frames'
timestamps). Each frame is resized keeping the displayed aspect ratio (anamorphic clips' sample
aspect ratio included) so that it covers the bucket, then center-cropped (or plainly resized with
`resize_mode="stretch"`).
Pixels come out as float in [-1, 1], shape (F, 3, H, W), the VAE's input convention. Nothing here
is random: the same clip and settings always give the same pixels.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from cogtune.data.video import VideoInfo, probe_video, read_frames, read_image
from cogtune.errors import DataError

ResizeMode = Literal["crop", "stretch"]

_BUCKET = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> Bucket:
        match = _BUCKET.match(text)
        sizes = [int(g) for g in match.groups()] if match else []
        if not sizes or 0 in sizes:
            raise DataError(f"bucket '{text}' is not FRAMESxHEIGHTxWIDTH (e.g. 49x480x720)")
        return cls(*sizes)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width

    @property
    def aspect(self) -> float:
        return self.width / self.height


FrameSampling = Literal["uniform", "fps"]


def sample_frame_indices(available: int, wanted: int) -> list[int]:
    """`wanted` indices spread uniformly over `available` frames (first and last included)."""
    if available < wanted:
        raise DataError(f"clip has {available} frames, fewer than the {wanted} needed")
    if wanted == 1:
        return [0]
    return [round(i * (available - 1) / (wanted - 1)) for i in range(wanted)]


def _stride(info: VideoInfo, target_fps: float) -> float:
    if info.fps <= 0:
        raise DataError("clip has no frame rate, so it cannot be sampled at a target fps (use uniform sampling)")
    return info.fps / target_fps


def sampleable_frames(info: VideoInfo, sampling: FrameSampling = "uniform", target_fps: float | None = None) -> int:
    """How many frames the clip can give under a sampling rule (all of them for `uniform`)."""
    if sampling == "uniform" or target_fps is None:
        return info.frames
    if info.timestamps:  # variable frame rate: what fits in the clip's time span
        return int((info.timestamps[-1] - info.timestamps[0]) * target_fps + 1e-6) + 1
    return int((info.frames - 1) // _stride(info, target_fps)) + 1


def _timed_indices(timestamps: Sequence[float], wanted: int, target_fps: float) -> list[int]:
    """Variable frame rate: the frames nearest `wanted` instants `1/target_fps` apart, centred in the clip."""
    times = np.asarray(timestamps, dtype=float)
    needed = (wanted - 1) / target_fps
    span = float(times[-1] - times[0])
    if needed > span + 1e-6:
        raise DataError(f"clip lasts {span:.3g} s; {wanted} frames at {target_fps:g} fps need {needed:.3g} s")
    start = float(times[0]) + (span - needed) / 2
    indices = []
    for i in range(wanted):
        instant = start + i / target_fps
        right = int(np.searchsorted(times, instant))
        candidates = [c for c in (right - 1, right) if 0 <= c < len(times)]
        indices.append(min(candidates, key=lambda c: (abs(times[c] - instant), c)))
    return indices


def frame_indices(info: VideoInfo, wanted: int, sampling: FrameSampling = "uniform",
                  target_fps: float | None = None) -> list[int]:
    """Which source frames make up a `wanted`-frame clip."""
    if sampling == "uniform" or target_fps is None:
        return sample_frame_indices(info.frames, wanted)
    if info.timestamps:
        return _timed_indices(info.timestamps, wanted, target_fps)
    stride = _stride(info, target_fps)
    span = round((wanted - 1) * stride) + 1
    if span > info.frames:
        raise DataError(f"clip has {info.frames} frames; {wanted} frames at {target_fps:g} fps need {span}")
    start = (info.frames - span) // 2
    return [start + round(i * stride) for i in range(wanted)]


FrameExtraction = Literal["uniform", "head", "chunk", "slide"]


def _taken_frame(info: VideoInfo, position: int, sampling: FrameSampling, target_fps: float | None) -> int:
    """The source frame of the `position`-th frame taken from the clip's start (every frame, or at `target_fps`)."""
    if sampling == "uniform" or target_fps is None:
        return position
    if info.timestamps:  # variable frame rate: the frame nearest the instant
        times = np.asarray(info.timestamps, dtype=float)
        instant = times[0] + position / target_fps
        right = int(np.searchsorted(times, instant))
        candidates = [c for c in (right - 1, right) if 0 <= c < len(times)]
        return min(candidates, key=lambda c: (abs(times[c] - instant), c))
    return min(info.frames - 1, round(position * _stride(info, target_fps)))


def window_starts(available: int, wanted: int, extraction: FrameExtraction, stride: int | None = None) -> list[int]:
    """Where each window of `wanted` frames starts among the `available` frames taken (head, chunk, slide)."""
    if available < wanted:
        return []
    if extraction == "head":
        return [0]
    step = wanted if extraction == "chunk" else stride
    if not step:
        raise DataError("slide frame extraction needs a frame stride")
    return list(range(0, available - wanted + 1, step))


def clip_windows(info: VideoInfo, wanted: int, extraction: FrameExtraction = "uniform",
                 sampling: FrameSampling = "uniform", target_fps: float | None = None,
                 stride: int | None = None) -> list[list[int]]:
    """The source-frame indices of every item a clip yields: one list per training item.

    `uniform` gives one item sampled by `frame_indices`; `head`, `chunk` and `slide` cut windows of
    consecutive frames taken (every frame, or at `target_fps` with fps sampling): the first one,
    non-overlapping ones, or one every `stride` frames taken. A still image gives its one frame.
    """
    if info.backend == "image":
        return [[0]]
    if extraction == "uniform":
        return [frame_indices(info, wanted, sampling, target_fps)]
    available = sampleable_frames(info, sampling, target_fps)
    if available < wanted:
        raise DataError(f"clip gives {available} frames, fewer than the {wanted} needed")
    return [[_taken_frame(info, start + i, sampling, target_fps) for i in range(wanted)]
            for start in window_starts(available, wanted, extraction, stride)]


def choose_bucket(info: VideoInfo, buckets: Sequence[Bucket], available: int | None = None) -> Bucket | None:
    """The bucket nearest the clip's aspect ratio, with the most frames the clip can fill.

    `available` is the number of frames the clip can give (see `sampleable_frames`). A still image
    takes only 1-frame buckets, a video only longer ones.
    """
    available = info.frames if available is None else available
    still = info.backend == "image"
    fitting = [b for b in buckets if b.frames <= available and (b.frames == 1) == still]
    if not fitting:
        return None
    aspect = info.aspect  # as displayed: anamorphic clips have non-square pixels
    best_distance = min(abs(np.log(b.aspect / aspect)) for b in fitting)
    nearest = [b for b in fitting if abs(np.log(b.aspect / aspect)) - best_distance < 1e-9]
    return max(nearest, key=lambda b: (b.frames, b.height * b.width))


def resize_frames(frames: np.ndarray, height: int, width: int, mode: ResizeMode = "crop", sar: float = 1.0):
    """uint8 (F, H, W, 3) to float (F, 3, height, width) in [-1, 1].

    `sar` is the source's sample aspect ratio: anamorphic pixels are `sar` times as wide as tall,
    so the picture is cropped as displayed (its width times `sar`), not squeezed.
    """
    import torch
    import torch.nn.functional as F

    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:  # decord's arrays are read-only; torch warns on sharing those
        frames = frames.copy()
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    src_h, src_w = video.shape[-2:]
    if mode == "crop":
        shown_w = src_w * (sar if sar > 0 else 1.0)
        scale = max(height / src_h, width / shown_w)
        new_h, new_w = max(height, round(src_h * scale)), max(width, round(shown_w * scale))
    else:
        new_h, new_w = height, width
    if (new_h, new_w) != (src_h, src_w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0)


def load_clip(path: str | Path, bucket: Bucket, *, mode: ResizeMode = "crop", info: VideoInfo | None = None,
              sampling: FrameSampling = "uniform", target_fps: float | None = None,
              indices: Sequence[int] | None = None):
    """The clip at `path` shaped to `bucket`: float (F, 3, H, W) in [-1, 1].

    `indices` names the source frames (one of `clip_windows`); default: sampled by `sampling`. A
    still image (`info.backend == "image"`) is one frame.
    """
    info = info or probe_video(path)
    if info.backend == "image":
        return load_image(path, bucket.height, bucket.width, mode)[None]
    if indices is None:
        indices = frame_indices(info, bucket.frames, sampling, target_fps)
    return resize_frames(read_frames(path, indices, info), bucket.height, bucket.width, mode=mode, sar=info.sar)


def load_image(path: str | Path, height: int, width: int, mode: ResizeMode = "crop"):
    """An image as float (3, H, W) in [-1, 1], upright and in RGB (`read_image`), resized like a clip's frames."""
    return resize_frames(read_image(path)[None], height, width, mode)[0]
