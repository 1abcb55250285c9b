"""Two processes (gloo, on the CPU) produce the same cache as one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.encode.compare import assert_same_cache
from tests.ports import free_port


@pytest.mark.slow
def test_two_processes_make_the_same_cache_as_one(tmp_path, synthetic_data, tiny_cache):
    common = ["encode", "--model", "tiny", "--data-root", str(synthetic_data), "--buckets", "9x64x64",
              "--num-workers", "0", "--validation-prompt", "A red circle moves left."]
    two = tmp_path / "two"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "cogtune", *common, "--output-dir", str(two)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stderr
    assert_same_cache(tiny_cache, two)
