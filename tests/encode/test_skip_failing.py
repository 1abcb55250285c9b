"""A clip that passes validation but fails while encoding: named with file and line, never a DataLoader traceback.

The clip is cut short (an interrupted download) after validation has probed it, so that its
frames fail only when a DataLoader worker decodes them.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.data.media import INTERNALS, make_clip, truncate, write_listing


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        make_clip(root / "videos" / f"{name}.mp4", size="64x64", frames=17, extra=("-movflags", "+faststart"))
    write_listing(root, ["videos/a.mp4", "videos/b.mp4", "videos/c.mp4"], ["first", "second", "third"])
    return root


@pytest.fixture
def cut_after_validation(monkeypatch, dataset):
    """Truncate videos/b.mp4 once `encode` has validated and planned (what a concurrent download would do)."""
    import cogtune.encode.run as run

    planned = run.plan_encode

    def plan_then_cut(*args, **kwargs):
        plan = planned(*args, **kwargs)
        clip = dataset / "videos" / "b.mp4"
        whole = clip.with_name("whole.bin")
        shutil.copy(clip, whole)
        truncate(whole, clip, 0.3)
        whole.unlink()
        return plan

    monkeypatch.setattr(run, "plan_encode", plan_then_cut)
    return dataset / "videos" / "b.mp4"


def _encode(cli, dataset, out, *extra):
    return cli("encode", "--model", "tiny", "--data-root", str(dataset), "--output-dir", str(out),
               "--buckets", "9x64x64", "--num-workers", "2", "--batch-size", "1", *extra)


def _no_internals(text):
    leaked = [marker for marker in INTERNALS + ("DataLoader", "worker process") if marker in text]
    assert not leaked, f"{leaked} in {text!r}"


def test_skip_invalid_skips_a_clip_failing_in_a_worker_and_finishes(cli, dataset, cut_after_validation, tmp_path):
    out = tmp_path / "cache"
    result = _encode(cli, dataset, out, "--skip-invalid")
    assert result.exit_code == 0, result.stderr
    assert "videos.txt:2: videos/b.mp4" in result.stderr
    _no_internals(result.stdout + result.stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(item["video"], item["line"]) for item in manifest["items"]] == [("videos/a.mp4", 1), ("videos/c.mp4", 3)]
    for item in manifest["items"]:
        assert (out / item["latent_file"]).is_file()


def test_without_skip_invalid_one_line_names_file_and_line(cli, dataset, cut_after_validation, tmp_path):
    out = tmp_path / "cache"
    result = _encode(cli, dataset, out)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "videos.txt:2: videos/b.mp4" in errors[0], result.stderr
    _no_internals(result.stdout + result.stderr)
    assert not (out / "manifest.json").exists()


def test_rerun_after_fixing_the_clip_completes_the_cache(cli, dataset, cut_after_validation, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "cache"
    assert _encode(cli, dataset, out, "--skip-invalid").exit_code == 0
    monkeypatch.undo()
    make_clip(cut_after_validation, size="64x64", frames=17)  # downloaded again
    result = cli("encode", "--model", "tiny", "--data-root", str(dataset), "--output-dir", str(out),
                 "--buckets", "9x64x64", "--num-workers", "0")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [item["line"] for item in manifest["items"]] == [1, 2, 3]
