"""`dataset prepare`: raw footage in, a dataset cogtune reads out.

Each source video (searched recursively in RAW) is split into shots by a PySceneDetect detector
(`--detector`: `adaptive` by default, PySceneDetect's own default; `content`; or `threshold` for fades),
with the detector's own default threshold unless `--threshold` is given; each shot is cut into back-to-back clips of exactly the model's frame count
at the model's frame rate (both asked of the `ModelSpec`); a shot too short for one clip is
skipped and counted. The output folder holds::

    clips/<source path>-s003-c01.mp4   one clip: shot 3, its first clip
    videos.txt, prompts.txt            the line-file layout every cogtune command reads
    prepare.json                       the manifest and report: settings, every shot, clip and skip
    report.txt                         the same report as a readable table

Clips are re-encoded (H.264, ffmpeg of imageio-ffmpeg): an exact frame count at a target rate
needs frame-accurate cuts and resampling, which stream copy (cuts at keyframes only, source rate
kept) cannot give. A source that already is exactly one clip at the target rate is copied as is.
Each written clip is decoded once more and must hold exactly the frame count.

Captions come from a sidecar `<video>.txt` (or `<video>.<ext>.txt`) beside the source, else from
a local image-text-to-text model (`--caption-model`) shown each clip's middle frame, else a
placeholder that `dataset validate` reports as `placeholder-caption`.

Resumable: `prepare.json` is rewritten atomically after each source, a finished source is never
redone, clips are written atomically and an existing clip is never overwritten. An OUT that holds
something other than a prepared dataset is refused. Captions edited in prompts.txt are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

from cogtune.config import MODEL_HELP, check_settings, require, setting
from cogtune.data.dataset import (CAPTION_PLACEHOLDER, DEFAULT_CAPTION_FILE, DEFAULT_VIDEO_FILE, VIDEO_EXTENSIONS,
                                  is_placeholder_caption, read_text_lines)
from cogtune.errors import ConfigError, DataError, ModelError, StorageError

MANIFEST_NAME = "prepare.json"
REPORT_NAME = "report.txt"
CLIPS_FOLDER = "clips"
MANIFEST_FORMAT = "cogtune-prepared-dataset"
MANIFEST_VERSION = 1
DEFAULT_CAPTION_PROMPT = "Describe this video in one detailed sentence."
_OWN_FILES = {MANIFEST_NAME, REPORT_NAME, CLIPS_FOLDER, DEFAULT_VIDEO_FILE, DEFAULT_CAPTION_FILE}


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Settings of one `cogtune dataset prepare` run."""

    raw: str = setting("", "Folder of raw footage (searched recursively).", path=True)
    output: str = setting("", "Dataset folder to write (new, or one an earlier prepare wrote).", path=True)
    model: str | None = setting(None, MODEL_HELP + " Its frame rule and fps give the clips' length.",
                                flag="--model", short="-m", metavar="MODEL")
    frames: int | None = setting(None, "Frames per clip; default: the model's.", flag="--frames", short="-F", low=1)
    fps: float | None = setting(None, "Frame rate of the clips; default: the model's.", flag="--fps", low=0,
                                low_open=True)
    detector: Literal["adaptive", "content", "threshold"] = setting(
        "adaptive", "PySceneDetect's shot detector: adaptive (its own default: content changes against their "
                    "neighbourhood), content (a fixed change threshold) or threshold (fades to and from black).",
        flag="--detector")
    threshold: float | None = setting(None, "The detector's threshold (lower finds more cuts); default: the "
                                            "detector's own (adaptive 3, content 27, threshold 12).",
                                      flag="--threshold", low=0, low_open=True)
    caption_model: str | None = setting(None, "Local transformers image-text-to-text model folder that captions "
                                              "clips without a sidecar caption.", flag="--caption-model", path=True)
    caption_prompt: str = setting(DEFAULT_CAPTION_PROMPT, "What the caption model is asked.",
                                  flag="--caption-prompt")

    def __post_init__(self) -> None:
        require(self, "raw", "output")
        check_settings(self)
        if self.model is None and (self.frames is None or self.fps is None):
            raise ConfigError("dataset prepare needs --model (whose frame rule and fps set the clips), "
                              "or both --frames and --fps")


@dataclasses.dataclass(frozen=True)
class ClipShape:
    frames: int
    fps: float
    model: str | None


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    output: Path
    manifest: dict[str, Any]

    @property
    def clips(self) -> list[dict[str, Any]]:
        return [clip for source in self.manifest["sources"].values() for clip in source.get("clips", [])]


def clip_shape(config: PrepareConfig) -> ClipShape:
    """The clips' frame count and rate: given, or the model's; the model's frame rule checked."""
    from cogtune.models.registry import ALL_PRESETS

    if config.model is None:  # no model named: the clips must suit every CogVideoX family's frame rule
        assert config.frames is not None and config.fps is not None
        step = math.lcm(*{spec.frame_step for spec in ALL_PRESETS.values()})
        if config.frames > 1 and (config.frames - 1) % step:
            lower = config.frames - (config.frames - 1) % step
            raise ConfigError(f"--frames {config.frames} breaks CogVideoX's frame rule {step}k+1 (every family's)"
                              + (f"; nearest below: {lower}" if lower > 1 else f"; at least {step + 1}"))
        return ClipShape(config.frames, config.fps, None)

    spec = ALL_PRESETS.get(config.model)
    if spec is None:
        from cogtune.models.loading import resolve_model

        spec = resolve_model(config.model).spec
    frames = config.frames if config.frames is not None else spec.default_frames
    problems = spec.frame_problems(frames)
    if problems:
        raise ConfigError(problems[0])
    return ClipShape(frames, float(config.fps if config.fps is not None else spec.fps), spec.name)


def find_sources(raw: Path) -> list[Path]:
    """Video files under `raw`, sorted; hidden files and folders are left out."""
    return sorted(path for path in raw.rglob("*") if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(raw).parts))


def clips_in_shot(start: int, end: int, source_fps: float, fps: float, frames: int) -> tuple[int, list[float]]:
    """(frames the shot gives at `fps`, start times in seconds of its back-to-back `frames`-frame clips).

    Output frame k of a clip starting at s shows the source frame nearest to s + k/fps; every one of
    them must lie inside the shot's frames `start`..`end - 1`.
    """
    if end <= start or source_fps <= 0:
        return 0, []
    available = math.floor((end - 1 - start) * fps / source_fps + 1e-6) + 1
    count = available // frames
    return available, [start / source_fps + index * frames / fps for index in range(count)]


# PySceneDetect's detector for each `--detector` name, and the keyword its threshold goes by.
_DETECTORS = {"adaptive": ("AdaptiveDetector", "adaptive_threshold"),
              "content": ("ContentDetector", "threshold"),
              "threshold": ("ThresholdDetector", "threshold")}


def detector_threshold(detector: str, given: float | None) -> float:
    """The threshold `detector` runs with: the one given, else PySceneDetect's own default for that detector."""
    if given is not None:
        return float(given)
    import inspect

    import scenedetect

    class_name, keyword = _DETECTORS[detector]
    return float(inspect.signature(getattr(scenedetect, class_name)).parameters[keyword].default)


def make_detector(detector: str, threshold: float) -> Any:
    """A new PySceneDetect detector (they keep state, so one per video)."""
    import scenedetect

    class_name, keyword = _DETECTORS[detector]
    # Every cut is kept (min_scene_len 1): a shot merged into its neighbour would put a cut inside a clip,
    # while a spurious cut only makes a shot too short, which is skipped. A video that ends in a fade-out
    # keeps its last shot, as PySceneDetect's command line does (`add-last-scene`).
    extra = {"add_final_scene": True} if detector == "threshold" else {}
    return getattr(scenedetect, class_name)(**{keyword: threshold}, min_scene_len=1, **extra)


def detect_shots(path: Path, detector: str, threshold: float) -> tuple[list[tuple[int, int]], float]:
    """Shots as (first frame, end frame exclusive) with a PySceneDetect detector, and the source fps.

    OpenCV reads a file's first video stream; when there are several (cover art in a .mkv, a second
    angle), shots are found in the one ffmpeg picks, which `cut_clip` cuts, remuxed alone to a
    temporary file.
    """
    import tempfile

    from cogtune.data.video import stream_headers

    header = stream_headers([path])[0]
    if getattr(header, "video_streams", 1) > 1:
        with tempfile.TemporaryDirectory(prefix="cogtune-shots-") as folder:
            alone = Path(folder) / "video.mkv"
            _ffmpeg(["-i", str(path), "-an", "-sn", "-dn", "-map_metadata", "-1", "-c", "copy", str(alone)],
                    f"ffmpeg could not read the video stream of {path}")
            return _detect_shots(alone, detector, threshold, path)
    return _detect_shots(path, detector, threshold, path)


def _ffmpeg(args: list[str], failure: str) -> None:
    from cogtune.data import ffprobe

    exe = ffprobe.ffmpeg_exe()
    if exe is None:
        raise StorageError("cannot read videos: the ffmpeg of imageio-ffmpeg is not available",
                           hint="pip install imageio-ffmpeg")
    result = subprocess.run([exe, "-nostdin", "-v", "error", "-y", *args], capture_output=True, text=True,
                            errors="replace", timeout=3600)
    if result.returncode != 0:
        raise DataError(f"{failure}: {(result.stderr.strip().splitlines() or ['unknown error'])[-1][:200]}")


def _detect_shots(path: Path, detector: str, threshold: float, source: Path) -> tuple[list[tuple[int, int]], float]:
    import logging

    from scenedetect import SceneManager, VideoOpenFailure, open_video

    from cogtune.quiet import muted_native_stderr

    logger = logging.getLogger("pyscenedetect")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings (backend fallbacks) are not ours to show
    try:
        with muted_native_stderr():  # OpenCV's ffmpeg prints its own complaints on a file it cannot open
            video = open_video(str(path))
        manager = SceneManager()
        manager.add_detector(make_detector(detector, threshold))
        manager.detect_scenes(video=video)
        scenes = manager.get_scene_list(start_in_scene=True)
        fps = float(video.frame_rate)
    except VideoOpenFailure as exc:
        raise DataError(f"{source}: cannot be opened as a video") from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: shot detection failed ({reason})") from exc
    finally:
        logger.setLevel(level)
    return [(start.frame_num, end.frame_num) for start, end in scenes], fps


def cut_clip(source: Path, target: Path, start: float, source_fps: float, frames: int, fps: float) -> None:
    """Write `frames` frames of `source` from `start` seconds, resampled to `fps`, as H.264 mp4 (atomically)."""
    from cogtune.data import ffprobe
    from cogtune.fsutil import atomic_path

    exe = ffprobe.ffmpeg_exe()
    if exe is None:
        raise StorageError("cannot cut clips: the ffmpeg of imageio-ffmpeg is not available",
                           hint="pip install imageio-ffmpeg")
    # Seek half a source frame early: the shot's first frame is kept, the one before it is not.
    seek = max(0.0, start - 0.5 / source_fps)
    with atomic_path(target, sweep=False) as tmp:  # clips/ is swept once, under the lock
        tmp_video = tmp.with_name(tmp.name + target.suffix)
        try:
            command = [exe, "-nostdin", "-v", "error", "-y", "-ss", f"{seek:.6f}", "-i", str(source),
                       "-an", "-sn", "-dn", "-map_metadata", "-1",  # no -map: ffmpeg's pick, never cover art
                       "-vf", f"fps={fps:g},scale=trunc(iw/2)*2:trunc(ih/2)*2",
                       "-frames:v", str(frames), "-c:v", "libx264", "-preset", "veryfast", "-crf", "17",
                       "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(tmp_video)]
            result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=3600)
            if result.returncode != 0:
                detail = (result.stderr.strip().splitlines() or ["unknown error"])[-1][:200]
                raise StorageError(f"ffmpeg could not cut {target.name} from {source}: {detail}")
            check_clip(tmp_video, frames, target)
            tmp_video.replace(tmp)
        finally:
            tmp_video.unlink(missing_ok=True)


def check_clip(path: Path, frames: int, target: Path) -> None:
    from cogtune.data import ffprobe

    try:
        count = ffprobe.decoded_frame_count(path)
    except ffprobe.FfmpegFailure as exc:
        raise StorageError(f"{target}: the clip written does not decode ({exc.reason})") from exc
    if count != frames:
        raise StorageError(f"{target}: the clip written has {count} frames, not {frames}")


class Captioner:
    """A local image-text-to-text model that captions one frame (transformers' Auto classes)."""

    def __init__(self, path: str | Path, prompt: str):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"caption model {folder} is not a folder",
                              hint="--caption-model takes a local transformers model folder")
        from cogtune.quiet import quiet_libraries

        quiet_libraries()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load the caption model {folder}: {first}",
                             hint="it must be a transformers image-text-to-text model with its processor") from exc
        self.prompt = prompt

    def __call__(self, image: Any) -> str:
        import torch

        text = self.prompt
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=64, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        caption = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        return " ".join(caption.split())


def sidecar_caption(source: Path) -> tuple[str, str] | None:
    """(caption, file name) from `<video>.txt` or `<video>.<ext>.txt` beside `source`, if one exists."""
    for candidate in (source.with_suffix(".txt"), source.with_name(source.name + ".txt")):
        if candidate.is_file():
            try:
                caption = " ".join(line.strip() for line in read_text_lines(candidate) if line.strip())
            except UnicodeDecodeError as exc:
                raise DataError(f"{candidate}: not UTF-8 text (byte {exc.start})") from exc
            if caption:
                return caption, candidate.name
    return None


def middle_frame(clip: Path, frames: int):
    from PIL import Image

    from cogtune.data.video import read_frames

    return Image.fromarray(read_frames(clip, [frames // 2])[0])


def _settings(shape: ClipShape, config: PrepareConfig) -> dict[str, Any]:
    return {"frames": shape.frames, "fps": shape.fps, "model": shape.model, "detector": config.detector,
            "threshold": detector_threshold(config.detector, config.threshold)}


def _detection(settings: dict[str, Any]) -> str:
    return f"{settings.get('detector')} detector, threshold {settings.get('threshold'):g}"


def _clip_names(raw: Path, sources: list[Path]) -> dict[Path, str]:
    """The clip-name stem of each source: its path under RAW without the extension (with it on a clash)."""
    stems = [source.relative_to(raw).with_suffix("").as_posix() for source in sources]
    return {source: stem if stems.count(stem) == 1 else source.relative_to(raw).as_posix().replace(".", "_")
            for source, stem in zip(sources, stems)}


def _open_output(out: Path, raw: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest of `out` (new or from an earlier run with the same settings); refuses foreign folders."""
    if out.resolve() == raw.resolve() or raw.resolve() in out.resolve().parents:
        raise ConfigError(f"the output folder {out} is inside the raw footage folder {raw}",
                          hint="write the dataset somewhere else")
    if out.resolve() in raw.resolve().parents:
        raise ConfigError(f"the raw footage folder {raw} is inside the output folder {out}")
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{manifest_path} is not a `cogtune dataset prepare` manifest")
        if manifest.get("settings") != settings:
            before = manifest.get("settings") or {}
            raise ConfigError(
                f"{out} was prepared with {before.get('frames')} frames at {before.get('fps'):g} fps "
                f"({_detection(before)}), not {settings['frames']} at {settings['fps']:g} fps "
                f"({_detection(settings)})",
                hint="prepare into a new folder, or repeat the earlier settings to resume "
                     f"(--detector {before.get('detector')} --threshold {before.get('threshold'):g})")
        return manifest
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out} is not a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES and not p.name.startswith("."))
        if others or (out / DEFAULT_VIDEO_FILE).exists() or (out / DEFAULT_CAPTION_FILE).exists():
            shown = ", ".join((others or [DEFAULT_VIDEO_FILE])[:3])
            raise ConfigError(f"{out} already holds files that `dataset prepare` did not write ({shown})",
                              hint="prepare into a new or empty folder; it never overwrites")
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "settings": settings,
            "raw": str(raw.resolve()), "sources": {}}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    from cogtune.fsutil import atomic_write_text

    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def _write_listings(out: Path, manifest: dict[str, Any]) -> None:
    """videos.txt and prompts.txt of every clip, keeping captions already edited in prompts.txt."""
    from cogtune.fsutil import atomic_write_text

    edited: dict[str, str] = {}
    videos_path, captions_path = out / DEFAULT_VIDEO_FILE, out / DEFAULT_CAPTION_FILE
    if videos_path.is_file() and captions_path.is_file():
        old_videos, old_captions = read_text_lines(videos_path), read_text_lines(captions_path)
        if len(old_videos) == len(old_captions):
            edited = {v.strip(): c.strip() for v, c in zip(old_videos, old_captions)
                      if c.strip() and not is_placeholder_caption(c)}
    videos, captions = [], []
    for source in manifest["sources"].values():
        for clip in source.get("clips", []):
            videos.append(clip["video"])
            captions.append(edited.get(clip["video"], clip["caption"]))
    atomic_write_text(videos_path, "".join(f"{v}\n" for v in videos))
    atomic_write_text(captions_path, "".join(f"{c}\n" for c in captions))


def report_rows(manifest: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per source: shots, clips kept, shots skipped too short, frames left over, note."""
    rows = []
    for name, source in manifest["sources"].items():
        shots = source.get("shots", [])
        short = sum(1 for shot in shots if shot.get("skipped") == "too-short")
        captions = {clip["caption_source"] for clip in source.get("clips", [])}
        note = source.get("error") or ", ".join(sorted(f"caption: {c}" for c in captions))
        rows.append((name, len(shots), len(source.get("clips", [])), short, source.get("unused_frames", 0), note))
    return rows


REPORT_COLUMNS = ("source", "shots", "clips kept", "shots too short", "frames unused", "note")


def _write_report(out: Path, manifest: dict[str, Any]) -> None:
    import io

    from rich.console import Console

    from cogtune import report
    from cogtune.fsutil import atomic_write_text

    settings = manifest["settings"]
    title = (f"dataset prepare: {settings['frames']}-frame clips at {settings['fps']:g} fps"
             + (f" ({settings['model']})" if settings["model"] else "") + f"; shots: {_detection(settings)}")
    text = io.StringIO()
    console = Console(file=text, width=160, highlight=False, soft_wrap=True)
    console.print(report.table(title, REPORT_COLUMNS, report_rows(manifest), to_stderr=True, numeric=False))
    totals = manifest.get("totals", {})
    console.print(f"{totals.get('clips', 0)} clips kept; {totals.get('skipped_shots', 0)} shots skipped "
                  f"(too short for {settings['frames']} frames at {settings['fps']:g} fps); "
                  f"{totals.get('failed_sources', 0)} sources unreadable")
    atomic_write_text(out / REPORT_NAME, text.getvalue())


def _totals(manifest: dict[str, Any]) -> dict[str, int]:
    sources = manifest["sources"].values()
    return {"sources": len(manifest["sources"]),
            "clips": sum(len(s.get("clips", [])) for s in sources),
            "shots": sum(len(s.get("shots", [])) for s in sources),
            "skipped_shots": sum(1 for s in sources for shot in s.get("shots", []) if shot.get("skipped")),
            "failed_sources": sum(1 for s in sources if s.get("error")),
            "placeholder_captions": sum(1 for s in sources for c in s.get("clips", [])
                                        if c["caption_source"] == "placeholder")}


def _prepare_source(source: Path, out: Path, stem: str, shape: ClipShape, settings: dict[str, Any],
                    captioner: Any) -> dict[str, Any]:
    """Shots, clips and skips of one source; clips already on disk (an interrupted run) are kept."""
    from cogtune.data.video import VideoReadError, probe_video

    record: dict[str, Any] = {"size": source.stat().st_size, "shots": [], "clips": [], "unused_frames": 0}
    try:
        shots, source_fps = detect_shots(source, settings["detector"], settings["threshold"])
    except DataError as exc:
        reason = exc.message.removeprefix(f"{source}: ")
        try:
            probe_video(source)  # its reasons are more precise (empty, no video stream, truncated)
        except VideoReadError as failure:
            reason = failure.message.removeprefix(f"{source}: ")
        record["error"] = f"unreadable: {reason}"
        return record
    record["source_fps"] = source_fps
    sidecar = sidecar_caption(source)
    # A source that already is exactly one clip at the target rate needs no cut: it is copied as is.
    whole = None
    if len(shots) == 1 and abs(source_fps - shape.fps) < 1e-3:
        try:
            info = probe_video(source)
            whole = info.frames == shape.frames and source.suffix.lower() == ".mp4"
        except VideoReadError:
            whole = False
    for number, (start, end) in enumerate(shots, start=1):
        available, starts = clips_in_shot(start, end, source_fps, shape.fps, shape.frames)
        shot = {"shot": number, "start_frame": start, "end_frame": end, "start": start / source_fps,
                "end": end / source_fps, "frames_at_fps": available, "clips": len(starts)}
        if not starts:
            shot["skipped"] = "too-short"
            shot["reason"] = f"{available} frames at {shape.fps:g} fps, fewer than {shape.frames}"
        record["shots"].append(shot)
        record["unused_frames"] += available - len(starts) * shape.frames
        for index, clip_start in enumerate(starts, start=1):
            relative = f"{CLIPS_FOLDER}/{stem}-s{number:03d}-c{index:02d}.mp4"
            target = out / relative
            method = "existing"
            if not target.exists():  # never overwrite: a clip on disk is from an interrupted run of this one
                if whole:
                    from cogtune.fsutil import atomic_path

                    with atomic_path(target, sweep=False) as tmp:  # swept at the start
                        shutil.copyfile(source, tmp)
                    method = "copy"
                else:
                    cut_clip(source, target, clip_start, source_fps, shape.frames, shape.fps)
                    method = "re-encode"
            if sidecar is not None:
                caption, caption_source = sidecar[0], f"sidecar {sidecar[1]}"
            elif captioner is not None:
                caption = captioner(middle_frame(target, shape.frames)) or CAPTION_PLACEHOLDER
                caption_source = "model" if caption != CAPTION_PLACEHOLDER else "placeholder"
            else:
                caption, caption_source = CAPTION_PLACEHOLDER, "placeholder"
            record["clips"].append({"video": relative, "shot": number, "start": clip_start,
                                    "end": clip_start + shape.frames / shape.fps, "frames": shape.frames,
                                    "written": method, "caption": caption, "caption_source": caption_source})
    return record


def prepare_dataset(config: PrepareConfig) -> PrepareResult:
    """Turn the raw footage of `config.raw` into a dataset in `config.output` (see the module docstring)."""
    from cogtune import report
    from cogtune.fsutil import OutputLock, sweep_temporaries

    raw, out = Path(config.raw).expanduser(), Path(config.output).expanduser()
    if not raw.is_dir():
        raise ConfigError(f"raw footage folder {raw} is not a folder")
    shape = clip_shape(config)
    settings = _settings(shape, config)
    manifest = _open_output(out, raw, settings)
    if manifest["sources"] and manifest.get("raw") != str(raw.resolve()):
        report.warn(f"{out} was prepared from {manifest.get('raw')}; the videos of {raw} are added to it "
                    "(sources are named by their path under the raw folder)")
    sources = find_sources(raw)
    if not sources:
        raise DataError(f"no videos in {raw} ({', '.join(VIDEO_EXTENSIONS)})")
    captioner = None
    if config.caption_model is not None:
        with report.status(f"loading the caption model {config.caption_model}"):
            captioner = Captioner(config.caption_model, config.caption_prompt)
    names = _clip_names(raw, sources)
    with OutputLock(out):
        # Leftovers of atomic writes a killed run left behind (half-written clips); nothing else writes here.
        for folder in [out, out / CLIPS_FOLDER, *(p for p in (out / CLIPS_FOLDER).rglob("*") if p.is_dir())]:
            sweep_temporaries(folder)
        # The manifest first, and before the listings each time: a run stopped anywhere (a full disk, a kill)
        # leaves a folder that says it is prepare's, which a re-run resumes.
        _write_manifest(out, manifest)
        done = manifest["sources"]
        # A source that failed to open is tried again: it may have been replaced since.
        pending = [s for s in sources if done.get(s.relative_to(raw).as_posix(), {"error": True}).get("error")]
        if len(pending) < len(sources):
            report.info(f"resuming: {len(sources) - len(pending)} of {len(sources)} sources already prepared")
        with report.progress("preparing", total=len(sources), unit="video", completed=len(sources) - len(pending)) \
                as bar:
            for source in pending:
                record = _prepare_source(source, out, names[source], shape, settings, captioner)
                done[source.relative_to(raw).as_posix()] = record
                manifest["totals"] = _totals(manifest)
                _write_manifest(out, manifest)
                _write_listings(out, manifest)
                bar.advance(clips=manifest["totals"]["clips"])
        if captioner is not None:
            _caption_placeholders(out, manifest, captioner, shape.frames)
        manifest["totals"] = _totals(manifest)
        _write_manifest(out, manifest)
        _write_listings(out, manifest)
        _write_report(out, manifest)
    totals = manifest["totals"]
    if totals["placeholder_captions"]:
        report.warn(f"{report.plural(totals['placeholder_captions'], 'clip')} without a caption: prompts.txt holds "
                    f"'{CAPTION_PLACEHOLDER}' there (`cogtune dataset validate` flags it); write captions, add a "
                    "sidecar <video>.txt, or re-run with --caption-model")
    report.success(f"{report.plural(totals['clips'], 'clip')} of {shape.frames} frames at {shape.fps:g} fps in "
                   f"{out} ({totals['skipped_shots']} shots too short)")
    return PrepareResult(out, manifest)


def _caption_placeholders(out: Path, manifest: dict[str, Any], captioner: Any, frames: int) -> None:
    """Caption the clips an earlier run left with the placeholder (a re-run with --caption-model)."""
    for source in manifest["sources"].values():
        for clip in source.get("clips", []):
            if clip["caption_source"] == "placeholder":
                caption = captioner(middle_frame(out / clip["video"], frames))
                if caption:
                    clip["caption"], clip["caption_source"] = caption, "model"
