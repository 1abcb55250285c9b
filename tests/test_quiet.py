"""Third-party chatter stays off the user's terminal, unless --debug."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

IMPORT_DEEPSPEED = "from cogtune.quiet import quiet_libraries; quiet_libraries(); import deepspeed"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("debug", ["", "1"])
def test_deepspeeds_import_time_log_shows_only_with_debug(debug):
    """DeepSpeed logs its accelerator choice to stdout when imported (accelerate imports it to save a model);
    its own output is the oracle: there with --debug (COGTUNE_DEBUG=1), gone without."""
    import torch

    if debug and torch.cuda.is_available():
        pytest.skip("with a GPU, DeepSpeed finds its accelerator and has no warning to log")
    env = {**os.environ, "COGTUNE_DEBUG": debug}
    result = subprocess.run([sys.executable, "-c", IMPORT_DEEPSPEED], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    logged = "Setting accelerator to CPU" in result.stdout or "Setting ds_accelerator" in result.stdout
    assert logged == bool(debug), result.stdout


@pytest.mark.parametrize("enabled", [True, False])
def test_collections_paused_turns_automatic_collection_off_inside_and_restores_it(enabled):
    import gc

    from cogtune.quiet import collections_paused

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(KeyError), collections_paused():
            assert not gc.isenabled()
            raise KeyError("an import that fails")
        assert gc.isenabled() == enabled  # as it was, also after an error
    finally:
        (gc.enable if was else gc.disable)()
