"""`cogtune dataset download` against a loopback fake Hub (tests/fake_hub.py): nothing leaves 127.0.0.1.

Each test starts its own fake Hub and points huggingface_hub at it (HF_ENDPOINT, plus the library's
import-time constants), with offline mode lifted and an empty, private HF_HOME, so no real token,
cache or network is involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_subprocess
from tests.fake_hub import FakeHub, closed_port_url

REPO = "me/clips"
TOKEN = "hf_SECRETsecret123"


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, bytes]:
    """A small cogtune dataset: prompts.txt, videos.txt and three clips, as repo path -> content."""
    from cogtune.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("served"), count=3, frames=9, height=64, width=64)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big_file() -> bytes:
    """Larger than huggingface_hub's download chunk, so a dropped connection can resume mid-file."""
    from huggingface_hub import constants

    return os.urandom(constants.DOWNLOAD_CHUNK_SIZE + 2 * 1024 * 1024)


def _point_huggingface_hub_at(url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, this endpoint, an empty HF_HOME and no token, for this test only.

    huggingface_hub reads these settings into `constants` when it is imported (possibly before this
    test, with the suite's HF_HUB_OFFLINE=1), so the constants are patched as well as the variables.
    Its "agent harness" registry, fetched from the import-time endpoint whatever `endpoint=` says,
    is pre-seeded (fresh and empty) so that it is never fetched.
    """
    from huggingface_hub import constants

    home.mkdir(parents=True, exist_ok=True)
    (home / ".agent_harnesses.json").write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)  # 2.x


@pytest.fixture
def hub(tmp_path, monkeypatch, clip_files):
    """A running fake Hub serving REPO (the clip dataset), with huggingface_hub pointed at it."""
    with FakeHub() as server:
        server.add_repo(REPO, clip_files, branches=("main", "v1.0"))
        _point_huggingface_hub_at(server.url, tmp_path / "hf-home", monkeypatch)
        yield server


def _resolved_paths(hub: FakeHub, method: str, since: int = 0) -> list[str]:
    """Repo paths of the file requests (`resolve` URLs) made with `method`, from request number `since`."""
    return sorted(r.path.split("/resolve/", 1)[1].split("/", 1)[1]
                  for r in hub.requests[since:] if r.method == method and "/resolve/" in r.path)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _bar_figures(stderr: str) -> tuple[str, str]:
    """Bytes done and total as the byte progress bar's last line shows them (`12.6/12.6 MB 90.7 MB/s`).

    The line must carry a transfer rate too."""
    line = [line for line in stderr.splitlines() if line.strip().startswith("downloading ━")][-1]
    match = re.search(r"([\d.]+)/([\d.]+ (?:bytes|kB|MB|GB))\s+[\d.]+ (?:bytes|kB|MB|GB)/s", line)
    assert match, line
    return match.group(1), match.group(2)


def _bar_figures_for(total: int) -> tuple[str, str]:
    """What a finished bar shows for `total` bytes: every byte counted once, none missing."""
    from rich.filesize import decimal

    text = decimal(total)
    return text.split()[0], text


def _assert_one_line_failure(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_download_fetches_every_file_and_prints_the_validation_summary(cli, hub, clip_files, tmp_path):
    local_dir = tmp_path / "data"

    result = cli("dataset", "download", REPO, "--local-dir", local_dir)

    assert result.exit_code == 0, result.stderr
    for path, content in clip_files.items():
        assert (local_dir / path).read_bytes() == content, path
    assert _resolved_paths(hub, "GET") == sorted(clip_files)
    info = hub.requests_for("GET", f"/api/datasets/{REPO}")
    assert info and info[0].query.get("blobs") == ["true"]  # sizes for the progress bar
    assert f"downloaded '{REPO}' (dataset): {len(clip_files)} files" in result.stderr
    assert _bar_figures(result.stderr) == _bar_figures_for(sum(len(c) for c in clip_files.values()))
    assert "readable clips" in result.stdout and f"dataset {local_dir}" in result.stdout
    assert "dataset usable: 3 items" in result.stderr

    before = len(hub.requests)
    again = cli("dataset", "download", REPO, "--local-dir", local_dir)
    assert again.exit_code == 0, again.stderr
    assert _resolved_paths(hub, "GET", since=before) == []  # finished files are skipped
    assert f"{len(clip_files)} already here" in again.stderr


def test_include_downloads_only_matching_files(cli, hub, tmp_path):
    local_dir = tmp_path / "data"

    result = cli("dataset", "download", REPO, "--local-dir", local_dir, "--include", "*.txt", "--no-validate")

    assert result.exit_code == 0, result.stderr
    assert _resolved_paths(hub, "GET") == ["prompts.txt", "videos.txt"]
    assert _resolved_paths(hub, "HEAD") == ["prompts.txt", "videos.txt"]
    assert not (local_dir / "videos").exists()
    assert "readable clips" not in result.stdout  # --no-validate


def test_exclude_skips_matching_files_and_validation_reports_what_is_missing(cli, hub, clip_files, tmp_path):
    local_dir = tmp_path / "data"

    result = cli("dataset", "download", REPO, "--local-dir", local_dir, "--exclude", "videos/clip_002.mp4")

    assert _resolved_paths(hub, "GET") == sorted(p for p in clip_files if p != "videos/clip_002.mp4")
    assert not (local_dir / "videos" / "clip_002.mp4").exists()
    _assert_one_line_failure(result, "the download succeeded, but the dataset", "has 1 error (listed above)")
    assert "clip_002.mp4" in result.stderr  # the validation report names the missing clip


def test_patterns_that_match_nothing_fail_in_one_line(cli, hub, tmp_path):
    result = cli("dataset", "download", REPO, "--local-dir", tmp_path / "data", "--include", "*.zip")

    _assert_one_line_failure(result, f"no file of '{REPO}' (dataset) matches --include *.zip")
    assert _resolved_paths(hub, "GET") == []


def test_revision_is_passed_to_the_info_endpoint_and_files_come_from_its_commit(cli, hub, tmp_path):
    result = cli("dataset", "download", REPO, "--local-dir", tmp_path / "data", "--revision", "v1.0")

    assert result.exit_code == 0, result.stderr
    assert [r.path for r in hub.requests_for("GET", "/revision/v1.0")] == [f"/api/datasets/{REPO}/revision/v1.0"]
    commit = hub.repos[("dataset", REPO)].commit
    assert all(f"/resolve/{commit}/" in r.path for r in hub.requests if "/resolve/" in r.path)


def test_missing_revision_fails_in_one_line(cli, hub, tmp_path):
    result = cli("dataset", "download", REPO, "--local-dir", tmp_path / "data", "--revision", "no-such-branch")

    _assert_one_line_failure(result, "revision 'no-such-branch' not found", REPO)


def test_missing_repo_fails_in_one_line_naming_it(cli, hub, tmp_path):
    result = cli("dataset", "download", "me/missing", "--local-dir", tmp_path / "data")

    _assert_one_line_failure(result, "repository 'me/missing' (dataset) not found at", "--repo-type")
    assert result.stderr.strip() == _error_lines(result.stderr)[0]
    assert "hf auth login" in result.stderr


def test_repo_type_selects_the_api_path(cli, hub, tmp_path):
    result = cli("dataset", "download", REPO, "--local-dir", tmp_path / "data", "--repo-type", "model")

    _assert_one_line_failure(result, f"repository '{REPO}' (model) not found")
    assert hub.requests_for("GET", f"/api/models/{REPO}")


@pytest.mark.parametrize(("status", "fragment"), [(401, "refused the credentials"), (403, "is denied (403")])
def test_refused_access_fails_in_one_line(cli, hub, clip_files, tmp_path, status, fragment):
    hub.add_repo("me/locked", clip_files, deny_status=status)

    result = cli("dataset", "download", "me/locked", "--local-dir", tmp_path / "data")

    _assert_one_line_failure(result, fragment, "'me/locked'")


def test_unreachable_hub_fails_in_one_line(cli, tmp_path, monkeypatch):
    url = closed_port_url()
    _point_huggingface_hub_at(url, tmp_path / "hf-home", monkeypatch)

    result = cli("dataset", "download", REPO, "--local-dir", tmp_path / "data")

    _assert_one_line_failure(result, f"cannot reach the Hub at {url}")


def test_offline_mode_is_refused_with_a_clear_message(cli, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = cli("dataset", "download", REPO, "--local-dir", tmp_path / "data")

    _assert_one_line_failure(result, "HF_HUB_OFFLINE=1 is set; unset it to download")
    assert hub.requests == []


def test_dropped_connection_resumes_with_a_range_request(cli, hub, clip_files, big_file, tmp_path):
    hub.add_repo("me/big", {**clip_files, "extra/big.bin": big_file})
    hub.interrupt("extra/big.bin", after_bytes=len(big_file) - 1024 * 1024)
    local_dir = tmp_path / "data"

    result = cli("dataset", "download", "me/big", "--local-dir", local_dir)

    assert result.exit_code == 0, result.stderr
    starts = [r.range_start for r in hub.requests_for("GET", "/extra/big.bin")]
    assert starts[0] is None and len(starts) == 2 and starts[1] > 0, starts
    assert (local_dir / "extra" / "big.bin").read_bytes() == big_file
    assert _bar_figures(result.stderr) == _bar_figures_for(len(big_file) + sum(len(c) for c in clip_files.values()))


def test_interrupted_download_fails_in_one_line_and_the_next_run_completes_it(cli, hub, clip_files, big_file,
                                                                              tmp_path):
    hub.add_repo("me/big", {**clip_files, "extra/big.bin": big_file})
    hub.interrupt("extra/big.bin", after_bytes=len(big_file) - 1024 * 1024)
    hub.fail("extra/big.bin", status=503)  # the retry after the drop finds the server down
    local_dir = tmp_path / "data"

    first = cli("dataset", "download", "me/big", "--local-dir", local_dir)

    _assert_one_line_failure(first, "download of 'me/big' (dataset) interrupted", "re-run the same command")
    assert not (local_dir / "extra" / "big.bin").exists()
    for path, content in clip_files.items():
        assert (local_dir / path).read_bytes() == content, path

    before = len(hub.requests)
    second = cli("dataset", "download", "me/big", "--local-dir", local_dir)

    assert second.exit_code == 0, second.stderr
    assert _resolved_paths(hub, "GET", since=before) == ["extra/big.bin"]  # finished files are not fetched again
    assert (local_dir / "extra" / "big.bin").read_bytes() == big_file


@contextlib.contextmanager
def _ctrl_c_reaches_children():
    """Children started in this block take SIGINT as a terminal's foreground command does, also where this
    test run ignores it (a shell ignores SIGINT in what it starts in the background, and children inherit
    that: Python then installs no KeyboardInterrupt)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_download_in_one_line_and_the_next_run_completes_it(clip_files, big_file, tmp_path):
    """A real process, a slow Hub, SIGINT once the big file is flowing: the transfer threads stop,
    the process exits 1 with one line, and re-running fetches only what is missing."""
    local_dir = tmp_path / "data"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    with FakeHub(bytes_per_second=len(big_file) // 20) as hub:  # the big file alone would take ~20 s
        hub.add_repo("me/big", {**clip_files, "extra/big.bin": big_file})
        env["HF_ENDPOINT"] = hub.url
        command = [sys.executable, "-m", "cogtune", "dataset", "download", "me/big", "--local-dir", str(local_dir),
                   "--no-validate"]
        with _ctrl_c_reaches_children():
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while not hub.requests_for("GET", "/extra/big.bin") and process.poll() is None:
                time.sleep(0.05)
            time.sleep(0.5)  # some of the body is on its way
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=60)  # a hang guard: stopping waits for no file to finish
        finally:
            if process.poll() is None:
                process.kill()

        assert process.returncode == 1, stderr
        assert "Traceback" not in stdout + stderr
        errors = _error_lines(stderr)
        assert len(errors) == 1 and "download of 'me/big' (dataset) interrupted" in errors[0], stderr
        assert "re-run the same command" in stderr
        assert not (local_dir / "extra" / "big.bin").exists()

        hub.bytes_per_second = None
        before = len(hub.requests)
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

        assert again.returncode == 0, again.stderr
        assert "extra/big.bin" in _resolved_paths(hub, "GET", since=before)
        assert (local_dir / "extra" / "big.bin").read_bytes() == big_file


def test_token_is_sent_but_never_printed(cli, hub, clip_files, big_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.add_repo("me/big", {**clip_files, "extra/big.bin": big_file})
    hub.add_repo("me/locked", clip_files, deny_status=401)
    hub.interrupt("extra/big.bin", after_bytes=len(big_file) - 1024 * 1024)
    hub.fail("extra/big.bin", status=503)

    runs = [
        cli("dataset", "download", REPO, "--local-dir", tmp_path / "ok"),
        cli("dataset", "download", "me/missing", "--local-dir", tmp_path / "missing"),
        cli("dataset", "download", "me/locked", "--local-dir", tmp_path / "locked"),
        cli("dataset", "download", REPO, "--local-dir", tmp_path / "rev", "--revision", TOKEN),
        cli("dataset", "download", "me/big", "--local-dir", tmp_path / "big"),
    ]

    assert [run.exit_code for run in runs] == [0, 1, 1, 1, 1]
    for run in runs:
        assert TOKEN not in run.stdout + run.stderr
        assert "SECRET" not in run.stdout + run.stderr
    assert hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}"
                                for r in hub.requests if r.path != "/api/agent-harnesses")


def test_real_process_reports_a_missing_repo_in_one_line_without_the_token(hub, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN}

    result = run_subprocess("dataset", "download", "me/missing", "--local-dir", tmp_path / "data", env=env,
                            timeout=60)

    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: repository 'me/missing' (dataset) not found")
    assert len(result.stderr.strip().splitlines()) == 1
    assert TOKEN not in result.stdout + result.stderr
    assert hub.requests_for("GET", "/api/datasets/me/missing")[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_messages_are_redacted(monkeypatch):
    from cogtune.data.download import redact_secrets

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert redact_secrets(f"revision '{TOKEN}' not found") == "revision '***' not found"
    assert redact_secrets("(Authorization: Bearer abc.def)") == "(Authorization: Bearer ***)"
    monkeypatch.delenv("HF_TOKEN")
    saved_token = "hf_" + "aB3" * 11  # the shape of a real token, e.g. one read from the login file
    assert redact_secrets(f"rejected {saved_token} for me/x") == "rejected *** for me/x"
    assert redact_secrets("hf_hub_download failed") == "hf_hub_download failed"
