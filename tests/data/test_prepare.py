"""`dataset prepare`: raw footage with planted hard cuts in, exact-length clips and listings out.

The footage is made with the ffmpeg that imageio-ffmpeg ships (lavfi sources joined by `concat`),
and the clips are checked with that ffmpeg too (imageio-ffmpeg's reader), not cogtune's decoder.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from cogtune.data.dataset import CAPTION_PLACEHOLDER, DatasetConfig
from cogtune.data.prepare import PrepareConfig, prepare_dataset
from cogtune.data.validate import validate_dataset
from cogtune.errors import ConfigError
from cogtune.models.registry import TINY_PRESETS

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SOURCE_FPS = 24


def make_footage(path: Path, shots: list[tuple[str, float]], size: str = "96x64") -> None:
    """Hard cuts between lavfi sources (`testsrc2`, or a colour name), each `seconds` long, at 24 fps."""
    inputs: list[str] = []
    for source, seconds in shots:
        spec = f"testsrc2=s={size}:r={SOURCE_FPS}:d={seconds}" if source == "testsrc2" else \
            f"color=c={source}:s={size}:r={SOURCE_FPS}:d={seconds}"
        inputs += ["-f", "lavfi", "-i", spec]
    joined = "".join(f"[{i}:v]" for i in range(len(shots))) + f"concat=n={len(shots)}:v=1[v]"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([FFMPEG, "-v", "error", "-y", *inputs, "-filter_complex", joined, "-map", "[v]",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=120)


def decode(path: Path) -> tuple[np.ndarray, float]:
    """All frames (F, H, W, 3) and the stream's frame rate, as imageio-ffmpeg reads them."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])
    return frames, float(meta["fps"])


def is_colour(frame: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool(np.abs(frame.reshape(-1, 3).mean(0) - np.array(rgb)).max() < 25)


RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    """3 s of test pattern, a 0.5 s red flash (too short for a clip), 2.5 s of blue: cuts at frames 72 and 84."""
    raw = tmp_path_factory.mktemp("raw")
    make_footage(raw / "long.mp4", [("testsrc2", 3.0), ("red", 0.5), ("blue", 2.5)])
    return raw


@pytest.fixture(scope="module")
def prepared(footage, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    return prepare_dataset(PrepareConfig(raw=str(footage), output=str(out), model="tiny"))


def test_finds_the_planted_cuts_and_skips_the_short_shot(prepared):
    shots = prepared.manifest["sources"]["long.mp4"]["shots"]
    assert [(s["start_frame"], s["end_frame"]) for s in shots] == [(0, 72), (72, 84), (84, 144)]
    assert [s.get("skipped") for s in shots] == [None, "too-short", None]
    # At 8 fps: 3 s give 24 frames (two 9-frame clips), 0.5 s give 4 (none), 2.5 s give 20 (two).
    assert [s["clips"] for s in shots] == [2, 0, 2]
    report = (prepared.output / "report.txt").read_text()
    assert "long.mp4" in report and "too short" in report
    on_disk = json.loads((prepared.output / "prepare.json").read_text())
    assert on_disk["totals"]["skipped_shots"] == 1 and on_disk["totals"]["clips"] == 4


def test_clips_have_exactly_the_models_frame_count_and_fps(prepared):
    spec = TINY_PRESETS["tiny"]
    videos = (prepared.output / "videos.txt").read_text().split()
    assert len(videos) == 4
    for relative in videos:
        frames, fps = decode(prepared.output / relative)
        assert len(frames) == spec.default_frames == 9
        assert imageio_ffmpeg.count_frames_and_secs(str(prepared.output / relative))[0] == 9
        assert fps == pytest.approx(spec.fps)
        # No frame of the red flash leaks into a clip across a cut.
        assert not any(is_colour(frame, RED) for frame in frames), relative
    for relative in videos[2:]:  # the blue shot's clips are blue from their first frame to their last
        frames, _ = decode(prepared.output / relative)
        assert all(is_colour(frame, BLUE) for frame in frames), relative


def test_placeholder_captions_fail_validation(prepared):
    captions = (prepared.output / "prompts.txt").read_text().splitlines()
    assert captions == [CAPTION_PLACEHOLDER] * 4
    result = validate_dataset(DatasetConfig(root=str(prepared.output)), frames=9, model=TINY_PRESETS["tiny"])
    assert not result.ok
    assert {p.code for p in result.errors} == {"placeholder-caption"}
    assert [p.line for p in result.errors] == [1, 2, 3, 4]


def test_sidecar_captions_and_the_models_fps(tmp_path):
    """tiny-1.5 asks for 16 fps: 2 s at 24 fps give 32 frames at 16 fps, three 9-frame clips."""
    raw = tmp_path / "raw"
    make_footage(raw / "beach" / "wave.mp4", [("blue", 2.0)])
    (raw / "beach" / "wave.txt").write_text("A blue\nscreen.\n")
    result = prepare_dataset(PrepareConfig(raw=str(raw), output=str(tmp_path / "out"), model="tiny-1.5"))
    videos = (tmp_path / "out" / "videos.txt").read_text().split()
    assert videos == [f"clips/beach/wave-s001-c0{i}.mp4" for i in (1, 2, 3)]
    assert (tmp_path / "out" / "prompts.txt").read_text().splitlines() == ["A blue screen."] * 3
    for relative in videos:
        frames, fps = decode(tmp_path / "out" / relative)
        assert (len(frames), fps) == (9, 16.0)
    assert result.manifest["totals"]["placeholder_captions"] == 0
    check = validate_dataset(DatasetConfig(root=str(tmp_path / "out")), frames=9, model=TINY_PRESETS["tiny-1.5"])
    assert check.ok, [p.located() for p in check.errors]


def test_frame_rule_comes_from_the_spec(tmp_path):
    make_footage(tmp_path / "raw" / "a.mp4", [("blue", 1.0)])
    with pytest.raises(ConfigError, match="frame rule"):
        prepare_dataset(PrepareConfig(raw=str(tmp_path / "raw"), output=str(tmp_path / "out"), model="tiny",
                                      frames=12))
    with pytest.raises(ConfigError, match="--model"):
        PrepareConfig(raw="r", output="o", frames=9)


def test_resumes_without_redoing_or_overwriting(tmp_path):
    raw = tmp_path / "raw"
    make_footage(raw / "a.mp4", [("blue", 1.5)])
    make_footage(raw / "b.mp4", [("green", 1.5), ("red", 1.5)])
    out = tmp_path / "out"
    config = PrepareConfig(raw=str(raw), output=str(out), model="tiny")
    prepare_dataset(config)
    clips = sorted((out / "clips").glob("*.mp4"))
    assert [c.name for c in clips] == ["a-s001-c01.mp4", "b-s001-c01.mp4", "b-s002-c01.mp4"]
    # Interrupt b.mp4 half-way: its record is gone, one of its clips was written, the other not.
    manifest = json.loads((out / "prepare.json").read_text())
    del manifest["sources"]["b.mp4"]
    (out / "prepare.json").write_text(json.dumps(manifest))
    (out / "clips" / "b-s002-c01.mp4").unlink()
    kept = {c.name: os.stat(c).st_ino for c in clips if c.exists()}
    mtimes = {c.name: c.stat().st_mtime_ns for c in clips if c.exists()}
    (out / "prompts.txt").write_text("A blue screen, edited.\n[caption needed]\n[caption needed]\n")

    result = prepare_dataset(config)
    assert {c.name: os.stat(c).st_ino for c in sorted((out / "clips").glob("*.mp4")) if c.name in kept} == kept
    assert {c.name: c.stat().st_mtime_ns for c in (out / "clips").glob("*.mp4") if c.name in mtimes} == mtimes
    assert (out / "clips" / "b-s002-c01.mp4").is_file()
    assert [c["written"] for c in result.manifest["sources"]["b.mp4"]["clips"]] == ["existing", "re-encode"]
    assert (out / "prompts.txt").read_text().splitlines() == ["A blue screen, edited.", CAPTION_PLACEHOLDER,
                                                              CAPTION_PLACEHOLDER]
    assert len(decode(out / "clips" / "b-s002-c01.mp4")[0]) == 9

    with pytest.raises(ConfigError, match="prepared with 9 frames at 8 fps"):
        prepare_dataset(PrepareConfig(raw=str(raw), output=str(out), model="tiny-1.5"))


def test_the_default_detector_is_pyscenedetects_own_and_finds_hue_only_cuts(tmp_path):
    """Red, green, blue of equal brightness and saturation: only the hue changes at each cut.

    The oracle for "the library's own default" is PySceneDetect's command-line configuration (its
    `default-detector` and each detector's default threshold), read from the library.
    """
    from scenedetect._cli.config import CONFIG_MAP

    assert CONFIG_MAP["global"]["default-detector"] == f"detect-{PrepareConfig.__dataclass_fields__['detector'].default}"
    raw = tmp_path / "raw"
    make_footage(raw / "hues.mp4", [("0xFF0000", 1.5), ("0x00FF00", 1.5), ("0x0000FF", 1.5)])
    result = prepare_dataset(PrepareConfig(raw=str(raw), output=str(tmp_path / "out"), model="tiny"))
    settings = result.manifest["settings"]
    assert settings["detector"] == "adaptive"
    assert settings["threshold"] == CONFIG_MAP["detect-adaptive"]["threshold"].value
    shots = result.manifest["sources"]["hues.mp4"]["shots"]
    assert [(s["start_frame"], s["end_frame"]) for s in shots] == [(0, 36), (36, 72), (72, 108)]
    # Each clip shows one colour: no clip spans a cut.
    for clip, rgb in zip(result.clips, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        frames, _ = decode(result.output / clip["video"])
        assert all(is_colour(frame, rgb) for frame in frames)
    assert "adaptive detector, threshold 3" in (result.output / "report.txt").read_text()


@pytest.mark.parametrize("detector", ["content", "threshold"])
def test_other_detectors_run_with_their_own_default_threshold(tmp_path, detector):
    from scenedetect._cli.config import CONFIG_MAP

    raw = tmp_path / "raw"
    make_footage(raw / "a.mp4", [("testsrc2", 1.5), ("black", 1.5), ("testsrc2", 1.5)])
    result = prepare_dataset(PrepareConfig(raw=str(raw), output=str(tmp_path / "out"), model="tiny",
                                           detector=detector))
    assert result.manifest["settings"]["detector"] == detector
    assert result.manifest["settings"]["threshold"] == CONFIG_MAP[f"detect-{detector}"]["threshold"].value
    starts = [s["start_frame"] for s in result.manifest["sources"]["a.mp4"]["shots"]]
    if detector == "content":  # the cuts into and out of black
        assert starts == [0, 36, 72]
    else:  # one cut inside the black stretch (a fade out and in), where PySceneDetect's fade bias puts it
        assert len(starts) == 2 and 36 < starts[1] < 72


def test_a_given_threshold_is_recorded_and_resuming_with_another_detector_is_refused(tmp_path, cli):
    raw = tmp_path / "raw"
    make_footage(raw / "a.mp4", [("blue", 1.5)])
    out = tmp_path / "out"
    result = cli("dataset", "prepare", raw, out, "--model", "tiny", "--detector", "content", "--threshold", "20")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "prepare.json").read_text())["settings"]["threshold"] == 20
    result = cli("dataset", "prepare", raw, out, "--model", "tiny")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "content detector, threshold 20" in result.stderr and "adaptive detector, threshold 3" in result.stderr
    assert "--detector content --threshold 20" in result.stderr
    result = cli("dataset", "prepare", raw, out, "--model", "tiny", "--detector", "histogram")
    assert result.exit_code == 2 and "Invalid value for '--detector'" in result.stderr  # a usage error, as elsewhere


def test_refuses_a_folder_that_holds_something_else(tmp_path, cli):
    make_footage(tmp_path / "raw" / "a.mp4", [("blue", 1.5)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    result = cli("dataset", "prepare", tmp_path / "raw", tmp_path / "out", "--model", "tiny")
    assert result.exit_code == 1
    assert "already holds files" in result.stderr and "notes.md" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.md"]


def test_cli_end_to_end(tmp_path, cli):
    make_footage(tmp_path / "raw" / "a.mp4", [("testsrc2", 1.5), ("blue", 1.5)])
    result = cli("dataset", "prepare", tmp_path / "raw", tmp_path / "out", "--model", "tiny", "--frames", "9")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "videos.txt").read_text().split() == ["clips/a-s001-c01.mp4", "clips/a-s002-c01.mp4"]
    assert "2 clips" in result.stderr


def build_tiny_vlm(folder: Path) -> Path:
    """A random Llava (CLIP vision tower, Llama text model) with a word-level tokenizer, built offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "describe", "this", "video", "in",
             "one", "detailed", "sentence.", "a", "red", "blue", "circle", "moves", "left", "right"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                  crop_size={"height": 28, "width": 28}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_index=4, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def transformers_caption(model_dir: Path, frame: np.ndarray, prompt: str) -> str:
    """The oracle: the model folder run directly through transformers on one frame, greedily."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[Image.fromarray(frame)], text=[text], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    return " ".join(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
                    .split())


@pytest.mark.slow
def test_caption_model_captions_clips_and_fills_placeholders(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_footage(raw / "a.mp4", [("blue", 1.5)])
    model_dir = build_tiny_vlm(tmp_path / "vlm")
    prepare_dataset(PrepareConfig(raw=str(raw), output=str(out), model="tiny"))
    assert (out / "prompts.txt").read_text().splitlines() == [CAPTION_PLACEHOLDER]

    # A re-run with a caption model captions the clips left with the placeholder.
    result = prepare_dataset(PrepareConfig(raw=str(raw), output=str(out), model="tiny", caption_model=str(model_dir),
                                           caption_prompt="describe this video in one detailed sentence."))
    frames, _ = decode(out / "clips" / "a-s001-c01.mp4")
    prompt = "describe this video in one detailed sentence."
    expected = transformers_caption(model_dir, frames[len(frames) // 2], prompt)
    assert expected
    assert (out / "prompts.txt").read_text().splitlines() == [expected]
    assert result.manifest["sources"]["a.mp4"]["clips"][0]["caption_source"] == "model"

    # And a first run with it captions as it cuts.
    fresh = prepare_dataset(PrepareConfig(raw=str(raw), output=str(tmp_path / "fresh"), model="tiny",
                                          caption_model=str(model_dir),
                                          caption_prompt="describe this video in one detailed sentence."))
    assert [c["caption"] for c in fresh.clips] == [expected]


def test_caption_model_must_be_a_folder(tmp_path):
    make_footage(tmp_path / "raw" / "a.mp4", [("blue", 1.5)])
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_dataset(PrepareConfig(raw=str(tmp_path / "raw"), output=str(tmp_path / "out"), model="tiny",
                                      caption_model=str(tmp_path / "missing")))


def test_an_unreadable_source_is_reported_and_the_rest_prepared(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_footage(raw / "good.mp4", [("blue", 1.5)])
    (raw / "broken.mp4").write_bytes(b"not a video at all" * 100)
    (out / "clips").mkdir(parents=True)
    (out / "clips" / ".tmp-good-s001-c01.mp4.x1y2").write_bytes(b"half a clip")  # a killed run's leftover
    result = prepare_dataset(PrepareConfig(raw=str(raw), output=str(out), model="tiny"))
    assert result.manifest["sources"]["broken.mp4"]["error"].startswith("unreadable")
    assert result.manifest["totals"]["failed_sources"] == 1
    assert (out / "videos.txt").read_text().split() == ["clips/good-s001-c01.mp4"]
    assert "unreadable" in (out / "report.txt").read_text()
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["good-s001-c01.mp4"]


def test_a_source_that_already_is_one_clip_is_copied(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "color=c=blue:s=64x64:r=8:d=1.125", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(raw / "exact.mp4")], check=True, timeout=60)
    assert imageio_ffmpeg.count_frames_and_secs(str(raw / "exact.mp4"))[0] == 9
    result = prepare_dataset(PrepareConfig(raw=str(raw), output=str(tmp_path / "out"), model="tiny"))
    assert [c["written"] for c in result.clips] == ["copy"]
    assert (tmp_path / "out" / "clips" / "exact-s001-c01.mp4").read_bytes() == (raw / "exact.mp4").read_bytes()
