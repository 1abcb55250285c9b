"""What the user sees while waiting: sampling and validation bars, Hub byte bars, offline errors, 80 columns.

What a terminal shows is checked in a pseudo-terminal (`_run_in_terminal`) where only a terminal
makes rich draw its live bars; the rest renders the report layer into a recording console.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from importlib.metadata import entry_points

import pytest
from rich.console import Console

from cogtune import report
from cogtune.errors import ModelError
from tests.fake_hub import FakeHub, closed_port_url

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _run_in_terminal(args: list[str], env: dict[str, str], columns: int = 80, timeout: float = 600) -> str:
    """Run `args` on a pseudo-terminal `columns` wide; what it wrote, as one string."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                               env={**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color", **env})
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                raise TimeoutError(f"{args} wrote nothing for {timeout} s")
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        process.wait(timeout=timeout)
        os.close(leader)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def _screen_lines(output: str) -> list[str]:
    """Every stretch of text the terminal drew between line breaks and carriage returns, styles removed."""
    return [line for line in re.split(r"[\r\n]", _ANSI.sub("", output)) if line.strip()]


def _cogtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "cogtune", *args]


@pytest.fixture
def recorded(monkeypatch):
    """The report layer's stderr as an 80-column terminal whose output the test reads."""
    buffer = io.StringIO()
    monkeypatch.setattr(report, "stderr", Console(file=buffer, width=80, force_terminal=True, color_system=None,
                                                  highlight=False, soft_wrap=True))
    return buffer


# --- sampling and validation -------------------------------------------------------------------

def test_sample_shows_the_denoising_steps_and_the_decode_in_80_columns(tmp_path):
    output = _run_in_terminal(_cogtune("sample", "--model", "tiny", "--prompt", "A red circle moves left.",
                                       "--output", str(tmp_path / "a.mp4"), "--steps", "4", "--frames", "9",
                                       "--height", "64", "--width", "64"), env={})
    lines = _screen_lines(output)
    text = "\n".join(lines)
    assert "video 1/1" in text and "step 4/4" in text and "decoding" in text
    assert re.search(r"✓ video 1/1: 4 steps in [\d.]+ s \([\d.]+ (steps/s|s/step)\), decoded in", text)
    assert not re.search(r"\d videos/s|s/videos|-- \w+/s", text)  # the old bar: `0/1 -- videos/s`
    ours = [line for line in lines if str(tmp_path) not in line]  # a path's length is the user's (and pytest's)
    assert max(len(line) for line in ours) <= 80, max(ours, key=len)


def test_validation_shows_a_bar_per_video(recorded, tmp_path, tiny_cache):
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import ValidationConfig

    prompts = ("A red circle moves left.", "A blue square moves right.")
    run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"), steps=1,
                             validation=ValidationConfig(prompts=prompts[:1], steps=3)))
    text = recorded.getvalue()
    # the LoRA's video, then the base's (the LoRA switched off, for the side-by-side): a bar each
    assert "validation 1/2" in text and "step 3/3" in text and "decoding" in text
    assert re.search(r"✓ validation 1/2: 3 steps in .*decoded in", text)
    assert re.search(r"✓ validation 2/2: 3 steps in .*decoded in", text)


# --- bar figures ---------------------------------------------------------------------------------

def test_plural():
    assert [report.plural(n, "error") for n in (0, 1, 2)] == ["0 errors", "1 error", "2 errors"]
    assert report.plural(2, "index", "indices") == "2 indices"


@pytest.mark.parametrize(("unit", "speed", "shown"), [
    ("clips", 2.5, "2.50 clips/s"),
    ("video", 0.25, "4.00 s/video"),
    ("videos", 0.25, "4.00 s/video"),
    ("step", None, ""),
])
def test_rate_reads_in_the_right_number_and_is_blank_before_the_first_item(unit, speed, shown):
    from rich.progress import Progress

    progress = Progress()
    progress.add_task("x", total=10)
    task = progress.tasks[0]
    task.finished_speed = speed
    assert report.RateColumn(unit).render(task).plain == shown


def test_a_busy_bar_fits_80_columns(recorded):
    with report.progress("training", total=1000, unit="step", completed=12) as bar:
        bar.advance(1, loss=0.123456, lr=1e-4, memory="12.3/80.0 GiB", note="a long field that cannot fit at all")
    lines = _screen_lines(recorded.getvalue())
    assert lines and max(len(line) for line in lines) <= 80
    assert "13/1000" in lines[-1] and "loss 0.1235" in lines[-1]


def test_key_values_have_no_empty_header_row(recorded):
    report.key_values("training run", [("model", "tiny"), ("steps", 10)], to_stderr=True)
    lines = _screen_lines(recorded.getvalue())
    assert lines[0].strip() == "training run"
    assert "model" in lines[2]  # title, top border, then the first row: no blank header and rule between


# --- the Hub ---------------------------------------------------------------------------------------

def test_hub_weights_download_with_a_byte_bar(tmp_path, tiny_model_dir):
    with FakeHub() as hub:
        hub.add_folder("someone/tiny", tiny_model_dir, repo_type="model")
        # Loaded twice in one process: the second load asks the Hub again and finds every file cached (no bar).
        script = ("from cogtune.quiet import quiet_libraries; quiet_libraries()\n"
                  "from cogtune.models.loading import ResolvedModel, load_transformer, resolve_model\n"
                  "spec = resolve_model('tiny').spec\n"
                  "for _ in range(2):\n"
                  "    load_transformer(ResolvedModel('someone/tiny', spec, 'hub', 'someone/tiny'))\n"
                  "    print('<loaded>', flush=True)\n")
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        output, again = _run_in_terminal([sys.executable, "-c", script], env=env).split("<loaded>", 1)
        size = (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
        assert len(hub.requests_for("GET", "diffusion_pytorch_model.safetensors")) == 1
    assert "<loaded>" in again
    lines = _screen_lines(output)
    assert any("downloading transformer" in line and re.search(r"[\d.]+/[\d.]+ (kB|MB)", line) for line in lines), lines
    assert size > 0
    assert "downloading" not in _ANSI.sub("", again)
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)


@pytest.fixture
def no_network(monkeypatch):
    """Online mode with the Hub's endpoint on a loopback port where nothing listens."""
    from huggingface_hub import constants

    from cogtune.models import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    loading._unreachable_reason.cache_clear()
    yield
    loading._unreachable_reason.cache_clear()


def test_unreachable_hub_is_one_error_with_the_ways_on(no_network):
    from cogtune.models.loading import load_transformer, resolve_model

    with pytest.raises(ModelError) as info:
        resolve_model("someone/not-cached")
    assert info.value.message.startswith("cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "`hf download someone/not-cached" in info.value.hint and "HF_HUB_OFFLINE=1" in info.value.hint
    with pytest.raises(ModelError, match="cannot reach the Hugging Face Hub"):
        load_transformer(resolve_model("cogvideox-2b"))


def test_unreachable_hub_from_the_cli_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run(_cogtune("sample", "--model", "someone/not-cached", "--prompt", "x", "--output",
                                     str(tmp_path / "x.mp4")), capture_output=True, text=True, timeout=300,
                            env={**env, "HF_ENDPOINT": closed_port_url()})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face Hub"), result.stderr


def test_hints_name_commands_that_exist():
    from cogtune.models import loading

    commands = {entry.name for entry in entry_points(group="console_scripts") if entry.value.startswith("huggingface_hub")}
    assert "hf" in commands
    for hint in (loading._OFFLINE_HINT, loading._UNREACHABLE_HINT):
        assert "`hf download" in hint and "huggingface-cli" not in hint


def test_the_training_bar_shows_one_step_time(recorded, tiny_cache, tmp_path):
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import LoraConfig, ValidationConfig

    run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"), steps=2,
                             lora=LoraConfig(rank=4), validation=ValidationConfig(final=False)))
    bars = [line for line in _screen_lines(recorded.getvalue()) if "training" in line and "2/2" in line]
    # one rate, in whichever direction reads best (s/step when slow, steps/s when fast), never both
    assert bars and all(line.count("s/step") + line.count("steps/s") == 1 for line in bars), bars


def test_one_error_is_said_in_the_singular(cli, synthetic_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    first = (data / "videos.txt").read_text().splitlines()[0]
    (data / first).write_bytes(b"")
    result = cli("dataset", "validate", data, "--frames", "9")
    assert result.exit_code == 1
    assert f"error: 1 error in {data}" in result.stderr
