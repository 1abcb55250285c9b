"""Shared fixtures: an isolated COGTUNE_HOME, tiny models, synthetic datasets and caches.

Everything is built offline from code; nothing touches the network or needs a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def cogtune_home(tmp_path_factory):
    """Tiny models are built once per session, here (subprocesses inherit it)."""
    home = tmp_path_factory.mktemp("cogtune-home")
    os.environ["COGTUNE_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(cogtune_home):
    from cogtune.models.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    from cogtune.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), count=4, frames=17, height=64, width=64)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, synthetic_data, cogtune_home):
    """A t2v cache of the synthetic dataset for the `tiny` model, with one validation prompt."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    root = tmp_path_factory.mktemp("cache") / "tiny"
    encode_dataset(EncodeConfig(model="tiny", output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)),
                                buckets=("9x64x64",), validation_prompts=("A red circle moves left.",),
                                num_workers=0))
    return root


@dataclasses.dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run the cogtune CLI in-process, through the real entry point (`main`)."""
    from cogtune.cli.app import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cogtune ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cogtune", *[str(a) for a in args]],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
