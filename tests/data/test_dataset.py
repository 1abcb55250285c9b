"""Reading datasets in every layout: line files, CSV/JSON/JSONL tables, a folder of clips."""

from __future__ import annotations

import json

import pytest

from cogtune.data.dataset import DatasetConfig, read_entries, read_text_lines
from cogtune.errors import ConfigError


def make(tmp_path, captions: bytes, videos: bytes):
    (tmp_path / "prompts.txt").write_bytes(captions)
    (tmp_path / "videos.txt").write_bytes(videos)
    return DatasetConfig(root=str(tmp_path))


def codes(problems):
    return [(p.code, p.path, p.line) for p in problems]


# --- line files ----------------------------------------------------------------------------------

def test_bom_crlf_and_trailing_blank_lines(tmp_path):
    config = make(tmp_path, "\ufeffA cat.\r\nA dog.\r\n\r\n\r\n".encode(), b"a.mp4\r\nb.mp4\r\n")
    entries, problems = read_entries(config)
    assert problems == []
    assert [e.caption for e in entries] == ["A cat.", "A dog."]
    assert [e.line for e in entries] == [1, 2]
    assert entries[1].video == tmp_path / "b.mp4"


def test_count_mismatch_names_the_longer_file_and_first_extra_line(tmp_path):
    _, problems = read_entries(make(tmp_path, b"one\ntwo\nthree\n", b"a.mp4\nb.mp4\n"))
    (problem,) = problems
    assert (problem.code, problem.path, problem.line) == ("count-mismatch", "prompts.txt", 3)
    assert "3 captions" in problem.message and "2 videos" in problem.message
    _, problems = read_entries(make(tmp_path, b"one\n", b"a.mp4\nb.mp4\n"))
    assert codes(problems) == [("count-mismatch", "videos.txt", 2)]


def test_empty_caption(tmp_path):
    _, problems = read_entries(make(tmp_path, b"one\n   \nthree\n", b"a.mp4\nb.mp4\nc.mp4\n"))
    assert codes(problems) == [("empty-caption", "prompts.txt", 2)]


def test_paths_escaping_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    config = make(root, b"a\nb\nc\n", b"../secret.mp4\n/etc/passwd\nok/../fine.mp4\n")
    entries, problems = read_entries(config)
    assert codes(problems) == [("path-outside-root", "../secret.mp4", 1), ("absolute-path", "/etc/passwd", 2)]
    assert all(p.source == "videos.txt" for p in problems)
    assert [e.video_ref for e in entries] == ["ok/../fine.mp4"]
    allowed, problems = read_entries(DatasetConfig(root=str(root), allow_outside_root=True))
    assert problems == [] and len(allowed) == 3


def test_symlink_leading_outside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (root / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    _, problems = read_entries(make(root, b"a\n", b"link.mp4\n"))
    assert codes(problems) == [("path-outside-root", "link.mp4", 1)]


def test_missing_caption_file(tmp_path):
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path)))
    assert entries == [] and problems[0].code == "missing-caption-file"


def test_not_utf8(tmp_path):
    _, problems = read_entries(make(tmp_path, "caf\xe9\n".encode("latin-1"), b"a.mp4\n"))
    assert codes(problems) == [("bad-encoding", "prompts.txt", None)]


def test_swapped_columns_are_caught(tmp_path):
    _, problems = read_entries(make(tmp_path, b"a.mp4\nb.mp4\n", b"A cat.\nA dog.\n"))
    assert "columns-swapped" in [p.code for p in problems]


def test_image_column(tmp_path):
    (tmp_path / "images.txt").write_text("a.png\n\n")
    config = make(tmp_path, b"a\nb\n", b"a.mp4\nb.mp4\n")
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path), image_column="images.txt"))
    assert codes(problems) == [("count-mismatch", "videos.txt", 2)]
    assert entries[0].image == tmp_path / "a.png" and entries[0].image_source == "images.txt"
    assert config.image_column is None


def test_id_token_is_prefixed(tmp_path):
    entries, _ = read_entries(make(tmp_path, b"a cat\n", b"a.mp4\n"))
    assert entries[0].caption_with("TOK") == "TOK a cat"


def test_read_text_lines_keeps_inner_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\n\nb\n\n")
    assert read_text_lines(path) == ["a", "", "b"]


# --- tables --------------------------------------------------------------------------------------

def test_csv_with_quoted_commas_and_newlines(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(
        '\ufeffvideo,caption\r\n'
        'a.mp4,"A cat, sitting."\r\n'
        'b.mp4,"A dog\r\nrunning, fast."\r\n'
        'c.mp4,\r\n'
        '\r\n'.encode()
    )
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="metadata.csv"))
    assert [e.caption for e in entries] == ["A cat, sitting.", "A dog\nrunning, fast.", ""]
    assert [e.line for e in entries] == [2, 3, 5]  # the multi-line record starts on line 3
    assert codes(problems) == [("empty-caption", "metadata.csv", 5)]


def test_csv_named_columns_and_aliases(tmp_path):
    (tmp_path / "m.csv").write_text("file_name,prompt\na.mp4,A cat.\n")
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="m.csv"))
    assert problems == [] and entries[0].video_ref == "a.mp4" and entries[0].caption == "A cat."
    (tmp_path / "n.csv").write_text("clip,words\na.mp4,A cat.\n")
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="n.csv", caption_column="words",
                                                   video_column="clip"))
    assert problems == [] and entries[0].caption == "A cat."
    _, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="n.csv", caption_column="nope"))
    assert problems[0].code == "missing-column" and "columns: clip, words" in problems[0].message


def test_json_list_rows(tmp_path):
    records = [{"video": "a.mp4", "caption": "A cat."}, {"video": "../b.mp4", "caption": "B"}, "oops"]
    (tmp_path / "d.json").write_text(json.dumps(records))
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="d.json"))
    assert len(entries) == 1
    assert codes(problems) == [("bad-dataset-file", "d.json", 3), ("path-outside-root", "../b.mp4", 2)]


def test_jsonl_lines(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"video": "a.mp4", "caption": "A"}\n\n{"video": "b.mp4"\n'
                                      '{"video": "c.mp4", "caption": "  "}\n')
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="d.jsonl"))
    assert [e.video_ref for e in entries] == ["a.mp4", "c.mp4"]
    assert codes(problems) == [("bad-dataset-file", "d.jsonl", 3), ("empty-caption", "d.jsonl", 4)]


def test_dataset_file_must_be_a_table():
    with pytest.raises(ConfigError, match="must be .csv, .json or .jsonl"):
        DatasetConfig(root=".", dataset_file="data.parquet")


def test_missing_dataset_file(tmp_path):
    _, problems = read_entries(DatasetConfig(root=str(tmp_path), dataset_file="nope.csv"))
    assert codes(problems) == [("missing-dataset-file", "nope.csv", None)]


# --- folder of clips -----------------------------------------------------------------------------

def test_folder_of_clips_with_captions(tmp_path):
    (tmp_path / "clips" / "b").mkdir(parents=True)
    for name in ("clips/a.mp4", "clips/b/c.mp4", "clips/d.mov", ".cache/hidden.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "clips" / "a.txt").write_text("A cat\non a mat.\n")
    (tmp_path / "clips" / "b" / "c.txt").write_text("")
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path)))
    assert [e.video_ref for e in entries] == ["clips/a.mp4", "clips/b/c.mp4"]
    assert entries[0].caption == "A cat on a mat."
    assert codes(problems) == [("missing-caption", "clips/d.mov", None), ("empty-caption", "clips/b/c.txt", None)]


def test_nothing_recognisable(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    _, problems = read_entries(DatasetConfig(root=str(tmp_path)))
    assert [p.code for p in problems] == ["no-dataset"]


def test_windows_separators_are_accepted(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"x")
    entries, problems = read_entries(make(tmp_path, b"a\n", b"videos\\a.mp4\n"))
    assert problems == [] and entries[0].video == tmp_path / "videos" / "a.mp4"
