"""`dataset prepare` stopped by a full disk at any of its own files resumes to the same dataset."""

from __future__ import annotations

import json

import pytest

from cogtune import fsutil
from cogtune.data.prepare import PrepareConfig, prepare_dataset
from cogtune.errors import StorageError
from tests.data.test_prepare import make_footage


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    make_footage(folder / "a.mp4", [("blue", 1.5)])
    make_footage(folder / "b.mp4", [("testsrc2", 1.5), ("red", 1.5)])
    return folder


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    return prepare_dataset(PrepareConfig(raw=str(raw), output=str(tmp_path_factory.mktemp("ref") / "out"),
                                         model="tiny"))


@pytest.mark.parametrize("full_at", ["prepare.json", "videos.txt", "prompts.txt", "report.txt"])
@pytest.mark.parametrize("nth", [1, 2])
def test_a_full_disk_at_any_listing_then_a_rerun_gives_the_same_dataset(tmp_path, raw, reference, monkeypatch,
                                                                         full_at, nth):
    real = fsutil.atomic_write_bytes
    seen = {"count": 0}

    def filling(target, data):
        if target.name == full_at:
            seen["count"] += 1
            if seen["count"] == nth:
                raise StorageError(f"no space left on device while writing {target}")
        return real(target, data)

    monkeypatch.setattr(fsutil, "atomic_write_bytes", filling)
    config = PrepareConfig(raw=str(raw), output=str(tmp_path / "out"), model="tiny")
    try:
        prepare_dataset(config)
    except StorageError:
        pass
    else:
        assert full_at == "report.txt" and nth == 2  # written once only: no second write to fail
    monkeypatch.setattr(fsutil, "atomic_write_bytes", real)
    result = prepare_dataset(config)
    for name in ("videos.txt", "prompts.txt"):
        assert (result.output / name).read_text() == (reference.output / name).read_text()
    assert [c["video"] for c in result.clips] == [c["video"] for c in reference.clips]
    assert json.loads((result.output / "prepare.json").read_text())["totals"] == reference.manifest["totals"]
    assert not [p for p in result.output.rglob("*") if p.name.startswith(".tmp-")]

