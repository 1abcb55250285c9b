"""`--push-to-hub REPO`: check the target before training, upload the finished run after it.

The checks run in the plan, before any weight loads, so that a malformed repo id, offline mode or a
missing token fails at once rather than after hours of training. The upload happens on the main
process once everything is written: `HfApi.create_repo` (nothing happens if it exists) and one
`upload_folder` commit of the files a user needs (`files_to_push`). A failure there loses nothing:
the run stays in its folder, and the error names the `hf upload` command that retries the same
upload. The token is never handled here: huggingface_hub finds it (HF_TOKEN or `hf auth login`),
and messages built from library errors are redacted.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from cogtune import __version__, report
from cogtune.errors import ConfigError, StorageError
from cogtune.lora.format import LAYOUT_FILE_NAMES
from cogtune.train.config import TrainConfig
from cogtune.train.run_folder import RunFolder


def check_push_target(config: TrainConfig) -> None:
    """Before training: the repo id is well formed, the Hub is not switched off and a token exists."""
    repo_id = config.push_to_hub
    if repo_id is None:
        return
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it needs an owner (a user or organisation) and a name")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).split(". Use `repo_type`")[0].split(": '")[0]
        raise ConfigError(f"--push-to-hub '{repo_id}' is not a Hub model repo id: {reason}",
                          hint="a repo id looks like owner/name, e.g. me/cogvideox-lora") from None
    if constants.HF_HUB_OFFLINE or _is_true(os.environ.get("HF_HUB_OFFLINE")):
        raise ConfigError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE=1 is set",
                          hint="unset HF_HUB_OFFLINE, or train without --push-to-hub and upload later with `hf upload`")
    if get_token() is None:
        raise ConfigError("--push-to-hub needs a Hugging Face token with write access, and none is set",
                          hint="run `hf auth login`, or set HF_TOKEN")


def files_to_push(config: TrainConfig, card_files: list[str]) -> list[str]:
    """The upload's patterns, relative to the run's folder: the weights, config.toml, the card and
    what the card shows (checkpoints, logs and validation videos stay local)."""
    run = RunFolder.of(config)
    if config.full:
        weights = [f"{run.transformer.name}/*"]
    else:  # the extra layouts by exact name (`*.safetensors` would take the checkpoints too)
        weights = [run.lora_weights.name, *(run.layout(name).name for name in config.lora.save_formats
                                            if name in LAYOUT_FILE_NAMES)]
    return [*weights, run.config_file.name, run.model_card.name, *card_files]


def retry_command(repo_id: str, output_dir: str | Path, patterns: list[str], private: bool) -> str:
    """The `hf upload` command (huggingface_hub's CLI) that makes the same upload."""
    words = ["hf", "upload", repo_id, str(output_dir), "."]
    for pattern in patterns:
        words += ["--include", pattern]
    if private:
        words.append("--private")
    return shlex.join(words)


def push_run(config: TrainConfig, patterns: list[str]) -> str:
    """Upload the run's files to `config.push_to_hub`; returns the commit's URL.

    Raises StorageError, one line with the retry command, when the Hub refuses or cannot be reached.
    """
    from huggingface_hub import HfApi, constants

    from cogtune.data.download import redact_secrets

    assert config.push_to_hub is not None
    output_dir = Path(config.output_dir)
    _quiet_hub_library()
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, library_name="cogtune", library_version=__version__)
    try:  # huggingface_hub's own bars are off (cogtune.quiet): the spinner is the progress
        with report.status(f"uploading {output_dir} to {config.push_to_hub}"):
            repo = api.create_repo(config.push_to_hub, repo_type="model", private=config.hub_private or None,
                                   exist_ok=True)
            commit = api.upload_folder(repo_id=repo.repo_id, repo_type="model", folder_path=output_dir,
                                       allow_patterns=patterns, commit_message=f"cogtune: {output_dir.name}")
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = redact_secrets(lines[0][:300] if lines else type(exc).__name__)
        raise StorageError(
            f"upload to {config.push_to_hub} failed ({reason}); the run is saved locally in {output_dir}",
            hint=f"retry with: {retry_command(config.push_to_hub, output_dir, patterns, config.hub_private)}",
        ) from exc
    report.success(f"pushed to {endpoint}/{repo.repo_id}")
    return str(commit.commit_url)


def _quiet_hub_library() -> None:
    """huggingface_hub's own warnings stay off the terminal unless --debug."""
    from cogtune.quiet import debug_enabled

    from huggingface_hub.utils import logging as hub_logging

    if not debug_enabled():
        hub_logging.set_verbosity_error()


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")
