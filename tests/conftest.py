"""Shared fixtures: an isolated COGTUNE_HOME, tiny models, synthetic datasets and caches.

Everything is built offline from code; nothing touches the network or needs a GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# One intra-op thread per process. The suite runs 2 pytest-xdist workers on 2 cores, and many tests start
# launches of 2 to 4 processes more: torch's default (a thread per core in every process) oversubscribes
# the cores, and the tiny models' small ops spend that time in thread hand-offs. Set before torch is
# imported (here, or in a subprocess, which inherits it); a value the user set is kept. Measured on 2 idle
# cores, `tests/train/test_loop.py tests/train/test_memory_options.py tests/test_sample.py tests/lora` with
# `-n 2`: 46-57 s with 2 threads, 31 s with 1.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

# The `--compile` tests check what torch.compile does with cogtune's models (dynamo's graphs, AOT autograd,
# inductor's lowering and fusion: what a GPU's Triton code shares) against eager. On the CPU inductor
# builds each kernel with a C++ compiler; with its cache empty (a fresh machine) that build is most of
# their time. Here it builds scalar C++ (no SIMD intrinsics, which no GPU run uses): the four compile tests,
# cache empty, about 96 -> 78 s.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

# setuptools, imported before any test runs, as in a command's process. Inductor imports it (through
# torch.utils.cpp_extension) when it first builds a kernel; by then a test may have asked for `pip`
# (`importlib.util.find_spec("pip")`, as libraries do), which turns setuptools' distutils shim off for
# good in Python < 3.12, and setuptools' import then failed its own assertion: every cold-cache compile
# test of that worker failed (seen with `-n 3 --dist worksteal`; reproduced: find_spec("pip"), then a
# compile test with an empty TORCHINDUCTOR_CACHE_DIR fails, and passes with setuptools imported first).
try:
    import setuptools  # noqa: F401
except ImportError:  # (no setuptools: nothing to protect)
    pass


def pytest_configure(config):
    """Collecting imports torch, diffusers, peft and transformers: with the garbage collector paused (as
    `cogtune.startup` does for a command), collecting takes 5 s of CPU instead of 10 in each worker. Nothing
    is frozen: the estimator's trace freezes what exists for its own collections, and only where nothing is
    frozen yet (a frozen worker made the estimator tests a tenth slower)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller collects nothing
    gc.disable()


def pytest_collection_finish(session):
    gc.enable()


# The test files that take longest, first (seconds of wall time on 2 idle cores, measured in the suite on a fresh
# clone with an empty compile cache): pytest-xdist's `loadfile` hands out files in collection order (with
# `--no-loadscope-reorder`, as `make test` runs it), so the last files a worker gets are short ones and neither
# waits long for the other at the end. test_reshard.py resumes test_training.py's runs: third, so that it
# starts once they are under way (a worker that asks for a run another is making waits for it).
HEAVIEST_FIRST = (
    "tests/distributed/test_training.py",  # 71
    "tests/distributed/test_deepspeed.py",  # 47
    "tests/distributed/test_reshard.py",  # 27
    "tests/train/sizing/test_fast_trace.py",  # 71
    "tests/train/test_quantized_base.py",  # 57 (torch.compile; less with its cache warm)
    "tests/bench/test_acceptance.py",  # 51
    "tests/train/test_memory_options.py",  # 49 (torch.compile; less with its cache warm)
    "tests/encode/test_interrupt.py",  # 42
    "tests/test_progress.py",  # 37
    "tests/distributed/test_multinode.py",  # 31
    "tests/train/test_launch_interrupt.py",  # 29
    "tests/train/sizing/test_estimate.py",  # 17
    "tests/train/sizing/test_fsdp_oracle.py",  # 16
    "tests/train/test_training.py",  # 13
    "tests/train/test_validation_prompts.py",  # 13
    "tests/cli/test_help_examples.py",  # 12
    "tests/train/test_checkpoint_integrity.py",  # 11
    "tests/encode/test_worker_lifetime.py",  # 11
    "tests/data/test_download.py",  # 10
    "tests/train/sizing/test_breakdown.py",  # 9
    "tests/test_sample.py",  # 9
    "tests/test_demo.py",  # 8 (the demo run it shares with test_help_examples.py)
)


def pytest_collection_modifyitems(config, items):
    rank = {path: index for index, path in enumerate(HEAVIEST_FIRST)}
    # (a stable sort: the other files keep their order)
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
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


@pytest.fixture(scope="session")
def run_once(tmp_path_factory):
    """`run_once(name, build)`: the folder `build(folder)` fills, made once for the whole test run.

    Under pytest-xdist every worker has its own session, so session fixtures alone would build each
    tiny model, dataset and cache once per worker. The workers share their base folder's parent: the
    first to ask builds there under a file lock, the others wait for it and reuse the result (read only).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)

    def made(name: str, build) -> Path:
        folder, done = root / name, root / f"{name}.done"
        with FileLock(str(root / f"{name}.lock")):
            if not done.exists():
                if folder.exists():
                    shutil.rmtree(folder)  # a build that failed half-way
                build(folder)
                done.touch()
        return folder

    return made


@pytest.fixture(scope="session", autouse=True)
def cogtune_home(run_once):
    """Tiny models are built once per test run, here (subprocesses and the other workers share it;
    `ensure_tiny_model` writes each atomically, so concurrent builds are safe)."""
    home = run_once("cogtune-home", lambda folder: folder.mkdir())
    os.environ["COGTUNE_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def demo_run(run_once, cogtune_home):
    """`cogtune demo --output-dir DIR --steps 20` as a user runs it (a process of its own), once per test run:
    tests/test_demo.py checks it, tests/cli/test_help_examples.py runs the examples on copies of its folder.
    (DIR, exit code, stdout, stderr); read only."""

    def build(folder: Path) -> None:
        folder.mkdir()
        result = run_subprocess("demo", "--output-dir", folder / "demo", "--steps", "20")
        (folder / "result.json").write_text(json.dumps([result.returncode, result.stdout, result.stderr]))

    root = run_once("demo", build)
    code, stdout, stderr = json.loads((root / "result.json").read_text())
    return root / "demo", code, stdout, stderr


@pytest.fixture(scope="session")
def tiny_model_dir(cogtune_home, run_once):
    from cogtune.models.tiny import ensure_tiny_model

    run_once("tiny-model", lambda folder: (ensure_tiny_model("tiny"), folder.mkdir()))  # one worker builds it
    return ensure_tiny_model("tiny")


@pytest.fixture(scope="session")
def synthetic_data(run_once):
    from cogtune.data.synthetic import make_synthetic_dataset

    return run_once("data", lambda folder: make_synthetic_dataset(folder, count=4, frames=17, height=64, width=64))


@pytest.fixture(scope="session")
def tiny_cache(run_once, synthetic_data, cogtune_home):
    """A t2v cache of the synthetic dataset for the `tiny` model, with one validation prompt."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    def build(root):
        encode_dataset(EncodeConfig(model="tiny", output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)),
                                    buckets=("9x64x64",), validation_prompts=("A red circle moves left.",),
                                    num_workers=0))

    return run_once("tiny-cache", build)


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


@dataclasses.dataclass
class Sampled:
    latents: list  # per video, the denoised latents the VAE decodes (before any 8-bit video)
    prompt_embeds: list  # per video, the prompt embeddings it was denoised with


@pytest.fixture
def sampled(monkeypatch):
    """What each video of `cogtune sample` was made of, recorded through diffusers' own pipeline
    methods: tests compare these tensors, not the 8-bit mp4 (H.264 turns a rounding difference in the
    last float bit into a difference of several levels)."""
    import cogtune.models.loading as loading
    import cogtune.sample as sample

    record = Sampled([], [])
    build, generate = loading.build_pipeline, sample.generate_videos

    def recording_build(*args, **kwargs):
        pipe = build(*args, **kwargs)
        decode = pipe.decode_latents

        def recording_decode(latents):
            record.latents.append(latents.detach().clone())
            return decode(latents)

        pipe.decode_latents = recording_decode
        return pipe

    def recording_generate(*args, **kwargs):
        record.prompt_embeds.extend(row.clone() for row in kwargs["prompt_embeds"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(loading, "build_pipeline", recording_build)
    monkeypatch.setattr(sample, "generate_videos", recording_generate)
    return record


def run_subprocess(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cogtune ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cogtune", *[str(a) for a in args]],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
