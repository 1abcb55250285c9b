"""What decord cannot do, through the ffmpeg binary that imageio-ffmpeg ships.

decord's bundled FFmpeg has no AV1 decoder, does not read animated GIFs, and mis-sizes frames of
some widths (e.g. 72 pixels). The ffmpeg binary of imageio-ffmpeg (a dependency already: it
writes our mp4s) reads all of these. It is used here in four ways, each one subprocess:

- `stream_headers`: what the container headers say (codec, pixel format, size, sample aspect
  ratio, rotation, frame rate, how many video streams) of many files in one run: validation's
  fast path, where starting one ffmpeg per clip took most of the time;
- `stream_info`: the video stream's codec, pixel format, size, sample aspect ratio, rotation and
  frame rate, and every packet's timestamp, by remuxing to `framecrc` (`-c copy`: nothing is decoded);
- `decode`: chosen frames as uint8 RGB, rotated as the file says (ffmpeg's autorotate);
- `decoded_frame_count`: how many frames actually decode (a full decode, into checksums only),
  which finds files cut short.

The video stream is the one ffmpeg itself picks when told nothing (`-an -sn -dn`, no `-map`): a
cover-art picture or a thumbnail track listed first is not taken for the clip.

Failures are `FfmpegFailure(code, reason)` with a short reason written for users; ffmpeg's own
messages are kept out of it (they are shown with --debug only).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cogtune.quiet import debug_enabled

_TIMEOUT_S = 600
# No -map: ffmpeg picks the one video stream to read, as its players do (the default-marked, then the
# largest; never cover art); audio, subtitles and data are dropped.
_VIDEO_ONLY = ("-an", "-sn", "-dn")


class FfmpegFailure(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    codec: str
    width: int  # as displayed (after rotation), in stored pixels
    height: int
    sar: float  # sample (pixel) aspect ratio: a pixel is `sar` times as wide as tall
    rotation: int  # degrees, as the display matrix says (0, 90, 180, 270)
    fps: float  # the stream's average frame rate (0 when unknown)
    timestamps: tuple[float, ...]  # every frame's presentation time in seconds, sorted
    pix_fmt: str = ""  # ffmpeg's name of the decoded pixel format, e.g. yuv420p or yuv420p10le
    video_streams: int = 1  # video streams in the file, cover art and thumbnails not counted

    @property
    def high_bit_depth(self) -> bool:
        """More than 8 bits per sample (yuv420p10le, p010le, gray16le, rgb48le, ...)."""
        match = re.search(r"(\d+)(le|be)$", self.pix_fmt)
        return bool(match) and int(match.group(1)) > 8


@functools.cache
def ffmpeg_exe() -> str | None:
    """The imageio-ffmpeg binary, or None when it is not available."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or no binary for this platform
        return None


def available() -> bool:
    return ffmpeg_exe() is not None


def _run(args: Sequence[str], binary: bool = False) -> subprocess.CompletedProcess:
    exe = ffmpeg_exe()
    if exe is None:
        raise FfmpegFailure("unreadable-video", "cannot decode it (the ffmpeg of imageio-ffmpeg is not available)")
    try:
        return subprocess.run([exe, "-hide_banner", "-nostdin", *args], capture_output=True, timeout=_TIMEOUT_S,
                              text=not binary, **({} if binary else {"errors": "replace"}))
    except subprocess.TimeoutExpired as exc:
        raise FfmpegFailure("unreadable-video", f"reading it took over {_TIMEOUT_S} s") from exc


def _detail(stderr: str) -> str:
    """ffmpeg's last message, for --debug only."""
    if not debug_enabled():
        return ""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f" [ffmpeg: {lines[-1][:200]}]" if lines else ""


def _looks_like_mp4(path: str | Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(12)[4:8] == b"ftyp"
    except OSError:
        return False


def _input_failure(stderr: str, path: str | Path) -> FfmpegFailure:
    lowered = stderr.lower()
    if "moov atom not found" in lowered and _looks_like_mp4(path):
        return FfmpegFailure("unreadable-video", "the file is incomplete: its mp4 index (moov atom) is missing "
                                                "(an interrupted download or recording?)" + _detail(stderr))
    if "end of file" in lowered and _looks_like_mp4(path):
        return FfmpegFailure("unreadable-video", "the file ends inside its container header "
                                                "(truncated, e.g. an interrupted download)" + _detail(stderr))
    if "permission denied" in lowered:
        return FfmpegFailure("permission-denied", "permission denied: the file cannot be read")
    if "matches no streams" in lowered or "does not contain any stream" in lowered:
        return _no_video_stream(stderr)
    return FfmpegFailure("unreadable-video",
                         "not a readable video container (truncated, corrupt or not a video)" + _detail(stderr))


def _no_video_stream(stderr: str) -> FfmpegFailure:
    others = sorted(set(re.findall(r"Stream #\d+:\d+.*?: (Audio|Subtitle|Data|Attachment): (\w+)", stderr)))
    kinds = [f"{kind.lower()} ({codec})" for kind, codec in others]
    if re.search(r"Stream #\d+:\d+.*: Video: .*\((attached pic|thumbnail)\)", stderr):
        kinds.append("a cover picture")
    listed = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
    return FfmpegFailure("no-video-stream", "file has no video stream" + (f" (only {listed})" if kinds else ""))


# ffmpeg's own choice of stream, as it reports it: "Stream #0:1 -> #0:0 (copy)".
_MAPPED = re.compile(r"Stream #0:(\d+)(?:\[\w+\])?\S* -> #0:0")


def _video_stream_lines(stderr: str) -> dict[int, str]:
    """The input's video streams (cover art and thumbnails left out), by index."""
    lines = {}
    for line in stderr.splitlines():
        match = re.search(r"Stream #0:(\d+).*: Video: ", line)
        if match and "(attached pic)" not in line and "(thumbnail)" not in line:
            lines[int(match.group(1))] = line
    return lines


def _pixel_format(stream_line: str) -> str:
    """The pixel format in a stream line: `Video: h264 (High 10) (avc1 / 0x3163), yuv420p10le(tv, ...), 96x64`."""
    depth, fields, current = 0, [], ""
    for char in stream_line.partition("Video: ")[2]:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    return fields[1].strip().partition("(")[0] if len(fields) > 1 else ""


def _fraction(text: str) -> float:
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return 0.0
    return value if np.isfinite(value) and value > 0 else 0.0


def stream_info(path: str | Path) -> StreamInfo:
    """Metadata and packet timestamps of the video stream ffmpeg picks, without decoding it."""
    result = _run(["-i", str(path), *_VIDEO_ONLY, "-c", "copy", "-f", "framecrc", "-"])
    stderr, stdout = result.stderr, result.stdout
    header: dict[str, str] = {}
    packets: list[tuple[int, int]] = []  # (pts, dts)
    for line in stdout.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            header[key.strip().split(" ")[0]] = value.strip()
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 5 and fields[0] == "0":
            try:
                packets.append((int(fields[2]), int(fields[1])))
            except ValueError:  # NOPTS
                try:
                    packets.append((int(fields[1]), int(fields[1])))
                except ValueError:
                    continue
    if "dimensions" not in header:
        raise _input_failure(stderr, path)
    if not packets:
        raise FfmpegFailure("unreadable-video", "no frame of its video can be read (the file is truncated or damaged)")
    streams = _video_stream_lines(stderr)
    mapped = _MAPPED.search(stderr)
    if mapped and re.search(rf"Stream #0:{mapped.group(1)}\b.*: Video: .*\((attached pic|thumbnail)\)", stderr):
        raise _no_video_stream(stderr)  # a cover picture is all there is (an audio file)
    stream_line = streams.get(int(mapped.group(1)), "") if mapped else next(iter(streams.values()), "")
    codec_match = re.search(r"Video: (\w+)", stream_line)
    codec = codec_match.group(1) if codec_match else header.get("codec_id", "unknown")
    width, _, height = header["dimensions"].partition("x")
    width_i, height_i = int(width), int(height)
    sar = _fraction(header.get("sar", "1/1")) or 1.0
    rotation_match = re.search(r"rotation of (-?[\d.]+) degrees", stderr)
    rotation = int(round(float(rotation_match.group(1)))) % 360 if rotation_match else 0
    if rotation in (90, 270):
        width_i, height_i = height_i, width_i
        sar = 1.0 / sar
    fps_match = re.search(r"([\d.]+)(k?) fps", stream_line)
    fps = float(fps_match.group(1)) * (1000 if fps_match.group(2) else 1) if fps_match else 0.0
    time_base = _fraction(header.get("tb", "1/1")) or 1.0
    stamps = sorted(pts for pts, _ in packets)
    timestamps = tuple(round(p * time_base, 6) for p in stamps)
    if fps <= 0 and len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        fps = (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])
    return StreamInfo(codec, width_i, height_i, sar, rotation, fps, timestamps, _pixel_format(stream_line),
                      max(1, len(streams)))


def stream_headers(paths: Sequence[str | Path]) -> list[StreamInfo | FfmpegFailure]:
    """What each file's container header says of its video stream, for many files in one ffmpeg run.

    Only headers are read (`timestamps` is empty; `stream_info` reads the packets), so this costs one
    process start for the lot rather than one per file. ffmpeg stops at the first file it cannot
    open: that file is tried alone (for its own message) and the run goes on after it.
    """
    results: list[StreamInfo | FfmpegFailure] = []
    while len(results) < len(paths):
        rest = paths[len(results):]
        stderr = _run([arg for path in rest for arg in ("-i", str(path))]).stderr
        blocks = _input_blocks(stderr)[: len(rest)]
        results += [_header_info(block) for block in blocks]
        if len(blocks) < len(rest):  # rest[len(blocks)] could not be opened
            path = rest[len(blocks)]
            alone = _run(["-i", str(path)]).stderr
            block = _input_blocks(alone)
            results.append(_header_info(block[0]) if block else _input_failure(alone, path))
    return results


def _input_blocks(stderr: str) -> list[str]:
    """ffmpeg's dump of each input it opened ("Input #k, ... from '...':" and its indented lines)."""
    blocks: list[list[str]] = []
    inside = False
    for line in stderr.splitlines():
        if line.startswith("Input #"):
            blocks.append([line])
            inside = True
        elif inside and line.startswith(" "):
            blocks[-1].append(line)
        else:
            inside = False
    return ["\n".join(block) for block in blocks]


def _header_info(block: str) -> StreamInfo | FfmpegFailure:
    """One input's dump: its video stream (one of several: `video_streams` says how many), or why there is none."""
    lines = block.splitlines()
    starts = [i for i, line in enumerate(lines) if re.search(r"Stream #\d+:\d+.*: Video: ", line)
              and "(attached pic)" not in line and "(thumbnail)" not in line]
    if not starts:
        return _no_video_stream(block)
    first = starts[0]
    end = next((i for i in range(first + 1, len(lines)) if "Stream #" in lines[i]), len(lines))
    line, side = lines[first], "\n".join(lines[first + 1 : end])
    size = re.search(r", (\d+)x(\d+)(?:[ ,\[]|$)", line)
    if size is None:
        return FfmpegFailure("unreadable-video", "its video stream has no frame size (the file is damaged)")
    width, height = int(size.group(1)), int(size.group(2))
    sar_match = re.search(r"SAR (\d+):(\d+) DAR", line)
    sar = _fraction(f"{sar_match.group(1)}/{sar_match.group(2)}") if sar_match else 1.0
    sar = sar or 1.0
    rotation_match = re.search(r"rotation of (-?[\d.]+) degrees", side)
    rotation = int(round(float(rotation_match.group(1)))) % 360 if rotation_match else 0
    if rotation in (90, 270):
        width, height, sar = height, width, 1.0 / sar
    fps_match = re.search(r"([\d.]+)(k?) fps", line)
    fps = float(fps_match.group(1)) * (1000 if fps_match.group(2) else 1) if fps_match else 0.0
    codec = re.search(r"Video: (\w+)", line)
    return StreamInfo(codec.group(1) if codec else "unknown", width, height, sar, rotation, fps, (),
                      _pixel_format(line), len(starts))


def decode(path: str | Path, indices: Sequence[int], info: StreamInfo) -> np.ndarray:
    """The frames at `indices` (in presentation order) as uint8 RGB (F, H, W, 3)."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    selection = "+".join(f"eq(n\\,{i})" for i in wanted)
    result = _run(["-v", "error", "-i", str(path), *_VIDEO_ONLY, "-vf", f"select={selection}",
                   "-fps_mode", "passthrough", "-frames:v", str(len(wanted)), "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-"], binary=True)
    frame_bytes = info.width * info.height * 3
    data = result.stdout
    got = len(data) // frame_bytes if frame_bytes else 0
    if got < len(wanted) or len(data) % frame_bytes:
        stderr = result.stderr.decode("utf-8", "replace")
        if got == 0 and result.returncode != 0:
            if "decoder" in stderr.lower() and "not found" in stderr.lower() or "no decoder" in stderr.lower():
                raise FfmpegFailure("unreadable-video", f"no decoder for its codec '{info.codec}'")
        missing = wanted[got] if got < len(wanted) else wanted[-1]
        raise FfmpegFailure("unreadable-video", f"frame {missing} and later cannot be decoded "
                                                f"(the file is truncated or damaged){_detail(stderr)}")
    frames = np.frombuffer(data, np.uint8)[: len(wanted) * frame_bytes].reshape(len(wanted), info.height,
                                                                                 info.width, 3)
    position = {index: row for row, index in enumerate(wanted)}
    return frames[[position[int(i)] for i in indices]]


def decoded_frame_count(path: str | Path) -> int:
    """How many frames of the first video stream decode (a full decode; no pixels are transferred)."""
    result = _run(["-v", "error", "-i", str(path), *_VIDEO_ONLY, "-fps_mode", "passthrough", "-f", "framecrc", "-"])
    return sum(1 for line in result.stdout.splitlines() if line.startswith("0,"))
