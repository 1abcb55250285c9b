"""`dataset validate`: planted faults reported with code, file and line; exit codes; JSON shape."""

from __future__ import annotations

import json
import shutil

import pytest

from cogtune.data.dataset import DatasetConfig
from cogtune.data.synthetic import make_synthetic_dataset
from cogtune.data.validate import validate_dataset
from cogtune.models.registry import TINY_PRESETS


@pytest.fixture
def broken_data(tmp_path, synthetic_data):
    """A copy of the synthetic dataset with faults on known lines."""
    root = tmp_path / "broken"
    shutil.copytree(synthetic_data, root)
    (root / "videos" / "empty.mp4").write_bytes(b"")
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00garbage" * 200)
    short = make_synthetic_dataset(tmp_path / "short", count=1, frames=5, height=64, width=64)
    shutil.copy(short / "videos" / "clip_000.mp4", root / "videos" / "short.mp4")
    captions = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    captions += ["empty file", "corrupt file", "too short", "missing", "", "escapes"]
    videos += ["videos/empty.mp4", "videos/corrupt.mp4", "videos/short.mp4", "videos/nope.mp4", "videos/clip_000.mp4",
               "../outside.mp4"]
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    return root


def test_clean_dataset_has_no_problems(synthetic_data):
    result = validate_dataset(DatasetConfig(root=str(synthetic_data)), frames=9, height=64, width=64,
                              model=TINY_PRESETS["tiny"])
    assert result.ok and result.errors == [] and result.warnings == []
    assert result.stats["clips"] == 4
    assert result.stats["frames"] == {"min": 17, "median": 17, "max": 17}


def test_every_planted_fault_is_located(broken_data):
    result = validate_dataset(DatasetConfig(root=str(broken_data)), frames=9, model=TINY_PRESETS["tiny"])
    found = {(p.code, p.path, p.line) for p in result.errors}
    assert found == {
        ("empty-video", "videos.txt", 5),
        ("unreadable-video", "videos.txt", 6),
        ("too-few-frames", "videos.txt", 7),
        ("missing-file", "videos.txt", 8),
        ("empty-caption", "prompts.txt", 9),
        ("path-outside-root", "videos.txt", 10),
    }
    assert [(p.code, p.line) for p in result.warnings] == [("duplicate-entry", 9)]
    assert not result.ok


def test_model_frame_rule(synthetic_data):
    result = validate_dataset(DatasetConfig(root=str(synthetic_data)), frames=8, model=TINY_PRESETS["tiny"])
    assert [p.code for p in result.errors] == ["frame-rule"]


def test_low_resolution_is_a_warning(synthetic_data):
    result = validate_dataset(DatasetConfig(root=str(synthetic_data)), height=128, width=128)
    assert result.ok
    assert {p.code for p in result.warnings} == {"low-resolution"}


def test_cli_exit_codes_and_json(cli, synthetic_data, broken_data):
    good = cli("dataset", "validate", synthetic_data, "--frames", "9", "--json")
    assert good.exit_code == 0
    document = json.loads(good.stdout)
    assert set(document) == {"ok", "items", "errors", "warnings", "stats"}
    assert document["ok"] is True and document["items"] == 4

    bad = cli("dataset", "validate", broken_data, "--frames", "9", "--json")
    assert bad.exit_code == 1
    document = json.loads(bad.stdout)
    assert document["ok"] is False
    assert {"code", "path", "line", "message"} == set(document["errors"][0])
    assert "Traceback" not in bad.stderr


def test_cli_human_report(cli, broken_data):
    result = cli("dataset", "validate", broken_data, "--frames", "9", "--model", "tiny")
    assert result.exit_code == 1
    assert "videos.txt:5" in result.stderr and "[empty-video]" in result.stderr
    assert "error:" in result.stderr and "errors in" in result.stderr
