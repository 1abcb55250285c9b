"""`--push-to-hub`: the finished run's files arrive on a loopback fake Hub (tests/fake_hub.py), byte
for byte; the token is used and never shown or saved; a failed upload keeps the run and says how to retry.
"""

from __future__ import annotations

import shlex

import pytest

from tests.data.test_download import _point_huggingface_hub_at
from tests.fake_hub import FakeHub

REPO = "me/tiny-lora"
TOKEN = "hf_SECRETpushTOKEN0123456789abcdefXYZ"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running fake Hub with huggingface_hub pointed at it, and a token in HF_TOKEN."""
    with FakeHub() as server:
        _point_huggingface_hub_at(server.url, tmp_path / "hf-home", monkeypatch)
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", server.url)  # `hf upload` reads it, not HF_ENDPOINT
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def _train(cli, cache, output, *extra):
    return cli("train", "t2v", "--model", "tiny", "--data", cache, "--output-dir", output, "--steps", "2",
               "--rank", "4", "--checkpoint-every", "0", "--validation-steps", "2", *extra)


def _assert_token_nowhere(result, output) -> None:
    assert TOKEN not in result.stdout + result.stderr
    for path in output.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_uploads_the_weights_config_and_model_card(cli, hub, tiny_cache, tmp_path):
    from huggingface_hub import ModelCard

    output = tmp_path / "run"
    result = _train(cli, tiny_cache, output, "--push-to-hub", REPO, "--hub-private")

    assert result.exit_code == 0, result.stderr
    (commit,) = hub.commits
    assert commit["repo_id"] == REPO
    readme = output / "README.md"
    expected = {"pytorch_lora_weights.safetensors", "config.toml", "README.md", "model_card.gif"}
    assert set(commit["files"]) == expected
    for name, content in commit["files"].items():
        assert content == (output / name).read_bytes(), name
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.base_model == "tiny" and card.data.library_name == "diffusers"
    assert readme.read_bytes() == commit["files"]["README.md"]
    (create,) = hub.requests_for("POST", "/api/repos/create")
    commits = hub.requests_for("POST", f"/api/models/{REPO}/commit/main")
    assert commits[0].headers["authorization"] == f"Bearer {TOKEN}"  # huggingface_hub found the token itself
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    assert f"pushed to {hub.url}/{REPO}" in result.stderr
    _assert_token_nowhere(result, output)


@pytest.mark.parametrize("status", [403, pytest.param(500, marks=pytest.mark.slow)])
def test_a_failed_upload_keeps_the_run_and_names_the_retry_command(cli, hub, tiny_cache, tmp_path, status,
                                                                     monkeypatch):
    """403: refused at once; 500: huggingface_hub retries the commit 5 times first, with its exponential
    backoff (1 + 2 + 4 + 8 + 8 s), which the test records instead of sleeping through."""
    import types

    import huggingface_hub.utils._http as hub_http

    waits: list[float] = []
    monkeypatch.setattr(hub_http, "time", types.SimpleNamespace(**{**vars(hub_http.time), "sleep": waits.append}))
    output = tmp_path / "run"
    hub.fail_commits(status, times=6)

    result = _train(cli, tiny_cache, output, "--push-to-hub", REPO)

    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"upload to {REPO} failed" in errors[0] and f"the run is saved locally in {output}" in errors[0]
    for name in ("pytorch_lora_weights.safetensors", "config.toml", "README.md", "training_summary.json"):
        assert (output / name).is_file(), name
    assert not hub.commits and len(hub.requests_for("POST", "/commit/main")) == (6 if status == 500 else 1)
    assert len(waits) == (5 if status == 500 else 0)  # huggingface_hub's own retries, each after a backoff
    _assert_token_nowhere(result, output)

    # The command the error names makes the upload, run as the user would (huggingface_hub's own CLI).
    hub.commit_failures.clear()  # the Hub is back
    command = errors[0].split("retry with: ", 1)[1].rstrip(")")
    words = shlex.split(command)
    assert words[:2] == ["hf", "upload"]
    from huggingface_hub.cli.hf import main as hf_main

    import sys

    argv = sys.argv
    sys.argv = words
    try:
        hf_main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        sys.argv = argv
    (commit,) = hub.commits
    assert set(commit["files"]) == {"pytorch_lora_weights.safetensors", "config.toml", "README.md",
                                    "model_card.gif"}
    for name, content in commit["files"].items():
        assert content == (output / name).read_bytes(), name


@pytest.mark.parametrize(("repo", "reason"), [("no-owner", "needs an owner"), ("me/bad name", "alphanumeric"),
                                              ("a/b/c", "needs an owner")])
def test_a_malformed_repo_id_fails_before_training(cli, tiny_cache, tmp_path, repo, reason):
    result = _train(cli, tiny_cache, tmp_path / "run", "--push-to-hub", repo)

    assert result.exit_code == 1
    assert f"--push-to-hub '{repo}' is not a Hub model repo id" in result.stderr and reason in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_push_without_a_token_fails_before_training(cli, hub, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = _train(cli, tiny_cache, tmp_path / "run", "--push-to-hub", REPO)

    assert result.exit_code == 1
    assert "--push-to-hub needs a Hugging Face token" in result.stderr and "hf auth login" in result.stderr
    assert not (tmp_path / "run").exists()
