"""A command's start-up runs with the garbage collector paused (cogtune.startup), and nothing else does.

Checked through the real entry point (`main`, in-process): a heavy command's engine starts with the
collector on and the imported libraries frozen; a light command, a failing one and a heavy one all
leave the collector as they found it, with as much frozen as before.
"""

from __future__ import annotations

import gc

import pytest


@pytest.fixture
def collector():
    """The collector on before the test, and how many objects are frozen then (tests/conftest.py freezes what
    collecting imported): a command leaves the collector on and freezes nothing more."""
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    yield frozen
    gc.enable()


def test_a_heavy_command_starts_its_work_with_the_collector_on_and_the_libraries_loaded(cli, collector, monkeypatch,
                                                                                      tiny_cache, tmp_path):
    import sys

    import cogtune.train

    seen = {}

    def run_training(config):
        seen.update(enabled=gc.isenabled(),
                    loaded="diffusers.models.transformers.cogvideox_transformer_3d" in sys.modules)

    monkeypatch.setattr(cogtune.train, "run_training", run_training)
    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    # collection on, the libraries loaded (frozen only where this process had not imported them before:
    # the fresh-process test below checks the freezing)
    assert seen["enabled"] and seen["loaded"]
    assert gc.isenabled() and gc.get_freeze_count() <= collector  # (frozen objects freed since count no more)


def test_light_and_failing_commands_leave_the_collector_as_they_found_it(cli, collector, monkeypatch, tmp_path):
    import cogtune.accelerate_config

    seen = []
    real = cogtune.accelerate_config.accelerate_config_yaml

    def yaml(settings):
        seen.append(gc.isenabled())
        return real(settings)

    monkeypatch.setattr(cogtune.accelerate_config, "accelerate_config_yaml", yaml)
    assert cli("config", "accelerate", "--strategy", "ddp", "--gpus", "2").exit_code == 0
    assert seen == [False]  # paused while the command ran (it loads no library, and draws no bar)
    assert gc.isenabled() and gc.get_freeze_count() <= collector  # (frozen objects freed since count no more)
    assert cli("train", "t2v", "--model", "tiny", "--data", tmp_path / "missing",
               "--output-dir", tmp_path / "run").exit_code == 1
    assert gc.isenabled() and gc.get_freeze_count() <= collector  # (frozen objects freed since count no more)


def test_a_progress_bar_resumes_collection(collector):
    """Long work never runs with the collector off, whether or not its command loaded the libraries."""
    from cogtune import report, startup

    startup.pause_collection()
    try:
        assert not gc.isenabled()
        with report.progress("working", total=1):
            assert gc.isenabled()
    finally:
        startup.finish()
    assert gc.isenabled() and gc.get_freeze_count() <= collector  # (frozen objects freed since count no more)


def test_in_a_fresh_process_the_load_freezes_and_at_exit_what_is_left_is_frozen_again():
    """An `atexit` hook registered before the command runs after cogtune's (last in, first out)."""
    import subprocess
    import sys

    script = ("import atexit, gc\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
              "from cogtune import startup\n"
              "startup.pause_collection()\n"
              "startup.load_libraries(('torch',))\n"
              "print('loaded:', gc.get_freeze_count() > 100_000, gc.isenabled())\n"
              "startup.finish()\n"
              "print('finished:', gc.get_freeze_count(), gc.isenabled())\n"
              "from cogtune.cli.app import main\n"
              "main(['config', 'accelerate', '--strategy', 'ddp', '--gpus', '2'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == ["loaded: True True", "finished: 0 True"]  # in a fresh process the load freezes torch's
    assert lines[-1] == "frozen at exit: True"


def test_bench_loads_the_libraries_for_an_estimate_it_computes_and_not_for_a_cached_one(cli, collector, monkeypatch,
                                                                                       tmp_path):
    from cogtune import startup

    calls = []
    real = startup.load_libraries

    def load(*args, **kwargs):
        calls.append(gc.isenabled())
        real(*args, **kwargs)
        calls.append(gc.isenabled())  # (the freezing itself: the fresh-process test below)

    monkeypatch.setenv("COGTUNE_HOME", str(tmp_path / "home"))  # an empty estimate cache
    monkeypatch.setattr(startup, "load_libraries", load)
    args = ("bench", "memory", "--model", "tiny", "--rank", "4", "--estimate", "--no-validation")
    assert cli(*args).exit_code == 0
    assert calls == [True, True]  # under the progress bar (collection on), and on again after
    calls.clear()
    assert cli(*args).exit_code == 0
    assert calls == []  # read back from the cache
    assert gc.isenabled() and gc.get_freeze_count() <= collector  # (frozen objects freed since count no more)
