"""T5 on the CPU and the host's memory: float32 when it fits, the model's dtype when only that fits,
one line before anything loads when neither does (instead of the kernel killing the process)."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import T5Config, T5EncoderModel

from cogtune.errors import ModelError
from cogtune.models.loading import available_host_bytes
from cogtune.models.registry import get_preset
from cogtune.models.text import HOST_MARGIN_BYTES, text_encoder_dtype

GIB = 1024**3


def _t5_bytes(spec, dtype) -> int:
    """transformers' own parameter count of the preset's T5, times the dtype's size: the oracle."""
    with init_empty_weights():
        encoder = T5EncoderModel(T5Config(**spec.text_encoder_config))
    return encoder.num_parameters() * torch.empty((), dtype=dtype).element_size()


def test_t5_xxl_runs_in_float32_on_a_cpu_host_with_room():
    spec = get_preset("cogvideox-5b")
    assert _t5_bytes(spec, torch.float32) > 18 * GIB  # T5-XXL: 4.8 billion parameters
    assert text_encoder_dtype(spec, "cpu", available=_t5_bytes(spec, torch.float32) + HOST_MARGIN_BYTES) == torch.float32
    assert text_encoder_dtype(spec, "cpu", available=None) == torch.float32  # unknown: as before


def test_a_host_short_of_float32_room_runs_t5_in_the_models_dtype(capsys):
    spec = get_preset("cogvideox-5b")
    fp32, bf16 = _t5_bytes(spec, torch.float32), _t5_bytes(spec, torch.bfloat16)
    assert text_encoder_dtype(spec, "cpu", available=fp32 + HOST_MARGIN_BYTES - 1) == torch.bfloat16
    assert text_encoder_dtype(spec, "cpu", available=bf16 + HOST_MARGIN_BYTES) == torch.bfloat16
    out = capsys.readouterr()
    assert "T5 runs in bfloat16 on the CPU" in out.out + out.err
    assert f"{fp32 / GIB:.1f} GiB of host memory" in out.out + out.err


def test_a_host_without_room_is_refused_in_one_line():
    spec = get_preset("cogvideox-5b")
    bf16 = _t5_bytes(spec, torch.bfloat16)
    with pytest.raises(ModelError, match=f"needs {bf16 / GIB:.1f} GiB of host memory"):
        text_encoder_dtype(spec, "cpu", available=bf16 + HOST_MARGIN_BYTES - 1)


def test_a_gpu_runs_t5_in_the_models_dtype_whatever_the_host_has():
    assert text_encoder_dtype(get_preset("cogvideox-2b"), "cuda", available=0) == torch.float16


def test_available_host_memory_is_what_the_kernel_reports():
    with open("/proc/meminfo", encoding="ascii") as handle:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
    expected = fields["MemAvailable"] + fields.get("SwapFree", 0)
    assert abs(available_host_bytes() - expected) < 256 * 1024**2  # other processes come and go


def test_encode_refuses_before_loading_t5_on_a_host_without_room(cli, tmp_path, synthetic_data, monkeypatch):
    import cogtune.models.loading as loading

    monkeypatch.setattr(loading, "available_host_bytes", lambda: 1024**2)
    monkeypatch.setattr(loading, "load_text_encoder", lambda *a, **k: pytest.fail("T5 loaded"))
    result = cli("encode", "--model", "tiny", "--data-root", synthetic_data, "--output-dir", tmp_path / "cache")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the text encoder needs"), result.stderr
    assert "KiB of host memory on the CPU" in errors[0] and "1.0 MiB is available" in errors[0]  # tiny T5, fp32
    assert "Traceback" not in result.stderr
