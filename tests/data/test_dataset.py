"""Reading dataset files: real-world text, counts, empty captions, paths escaping the root."""

from __future__ import annotations

from cogtune.data.dataset import DatasetConfig, read_entries, read_text_lines


def make(tmp_path, captions: bytes, videos: bytes):
    (tmp_path / "prompts.txt").write_bytes(captions)
    (tmp_path / "videos.txt").write_bytes(videos)
    return DatasetConfig(root=str(tmp_path))


def test_bom_crlf_and_trailing_blank_lines(tmp_path):
    config = make(tmp_path, "\ufeffA cat.\r\nA dog.\r\n\r\n\r\n".encode(), b"a.mp4\r\nb.mp4\r\n")
    entries, problems = read_entries(config)
    assert problems == []
    assert [e.caption for e in entries] == ["A cat.", "A dog."]
    assert [e.line for e in entries] == [1, 2]
    assert entries[1].video == tmp_path / "b.mp4"


def test_count_mismatch_names_the_line(tmp_path):
    _, problems = read_entries(make(tmp_path, b"one\ntwo\nthree\n", b"a.mp4\nb.mp4\n"))
    (problem,) = problems
    assert (problem.code, problem.path, problem.line) == ("count-mismatch", "videos.txt", 3)
    assert "3 captions" in problem.message and "2 videos" in problem.message


def test_empty_caption(tmp_path):
    _, problems = read_entries(make(tmp_path, b"one\n   \nthree\n", b"a.mp4\nb.mp4\nc.mp4\n"))
    assert [(p.code, p.path, p.line) for p in problems] == [("empty-caption", "prompts.txt", 2)]


def test_paths_escaping_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    config = make(root, b"a\nb\nc\n", b"../secret.mp4\n/etc/passwd\nok/../fine.mp4\n")
    entries, problems = read_entries(config)
    assert [(p.code, p.line) for p in problems] == [("path-outside-root", 1), ("absolute-path", 2)]
    assert [e.video_ref for e in entries] == ["ok/../fine.mp4"]
    allowed, problems = read_entries(DatasetConfig(root=str(root), allow_outside_root=True))
    assert problems == [] and len(allowed) == 3


def test_missing_caption_file(tmp_path):
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    entries, problems = read_entries(DatasetConfig(root=str(tmp_path)))
    assert entries == [] and problems[0].code == "missing-caption-file"


def test_id_token_is_prefixed(tmp_path):
    entries, _ = read_entries(make(tmp_path, b"a cat\n", b"a.mp4\n"))
    assert entries[0].caption_with("TOK") == "TOK a cat"


def test_read_text_lines_keeps_inner_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\n\nb\n\n")
    assert read_text_lines(path) == ["a", "", "b"]
