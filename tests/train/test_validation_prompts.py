"""Validation prompts the cache lacks: embedded at training time with the model's T5, kept with the run.

The oracle for the embeddings is diffusers' own `CogVideoXPipeline.encode_prompt` on the tiny model,
and what `cogtune encode --validation-prompt` caches for the same prompt.
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

CACHED_PROMPT = "A red circle moves left."  # cached by the `tiny_cache` fixture, not by `bare_cache`
LONG_PROMPT = ("A long prompt about a red circle that moves slowly from the left of the frame to the right while a "
               "blue square spins in the corner and the background fades to black")
RUN_FILE = "validation_prompts.safetensors"


@pytest.fixture(scope="module")
def bare_cache(tmp_path_factory, synthetic_data):
    """A tiny t2v cache encoded without validation prompts."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    root = tmp_path_factory.mktemp("bare") / "cache"
    encode_dataset(EncodeConfig(model="tiny", output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)),
                                buckets=("9x64x64",), num_workers=0))
    return root


def _train(cli, cache, output, *more, model="tiny"):
    return cli("train", "t2v", "--model", model, "--data", cache, "--output-dir", output, "--rank", "4",
               "--validation-steps", "1", *more)


@pytest.fixture(scope="module")
def new_prompt_run(tmp_path_factory, bare_cache):
    """`cogtune train` with two prompts the cache lacks (one longer than tiny's 32 tokens), 2 steps; its
    folder, exit code and stderr (captured here: `capsys` is per test)."""
    from cogtune.cli.app import main

    output = tmp_path_factory.mktemp("run") / "run"
    capture = pytest.MonkeyPatch()
    stderr = io.StringIO()
    capture.setattr(sys, "stderr", stderr)
    try:
        main(["train", "t2v", "--model", "tiny", "--data", str(bare_cache), "--output-dir", str(output),
              "--rank", "4", "--steps", "2", "--validation-steps", "1", "--validation-every", "1",
              "--checkpoint-every", "1", "--validation-prompt", CACHED_PROMPT, "--validation-prompt", LONG_PROMPT])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        capture.undo()
    return output, code, stderr.getvalue()


def _stored(run):
    with safe_open(str(run / RUN_FILE), framework="pt") as handle:
        prompts = json.loads(handle.metadata()["prompts"])
    return prompts, load_file(str(run / RUN_FILE))["prompt_embeds"]


def test_training_renders_prompts_the_cache_lacks(new_prompt_run):
    run, code, stderr = new_prompt_run
    assert code == 0, stderr
    for folder in ("step-000001", "final"):
        assert (run / "validation" / folder / "00.mp4").is_file() and (run / "validation" / folder / "01.mp4").is_file()
    prompts, embeds = _stored(run)
    assert prompts == [CACHED_PROMPT, LONG_PROMPT]
    assert embeds.shape == (2, 32, 32)
    config = (run / "config.toml").read_text()
    assert CACHED_PROMPT in config and LONG_PROMPT in config
    # one warning, naming how many tokens of the long prompt were cut (the tokenizer counts them)
    from transformers import AutoTokenizer

    from cogtune.models.tiny import ensure_tiny_model

    tokens = len(AutoTokenizer.from_pretrained(ensure_tiny_model("tiny"), subfolder="tokenizer")(LONG_PROMPT).input_ids)
    assert tokens > 32
    warnings = [line for line in stderr.splitlines() if "tokens" in line and "cut" in line]
    assert len(warnings) == 1 and f"its last {tokens - 32} tokens were cut" in warnings[0]


def test_embeddings_are_the_pipelines_and_what_encode_caches(new_prompt_run, tiny_model_dir, tiny_cache):
    from diffusers import CogVideoXPipeline

    run, code, stderr = new_prompt_run
    assert code == 0, stderr
    _, embeds = _stored(run)
    pipe = CogVideoXPipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    with torch.no_grad():  # as the pipeline's __call__ runs it (autograd's CPU kernels differ in the last bits)
        expected, _ = pipe.encode_prompt([CACHED_PROMPT, LONG_PROMPT], do_classifier_free_guidance=False,
                                         max_sequence_length=32, device="cpu", dtype=torch.float32)
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds, expected)
    # `cogtune encode --validation-prompt` cached the same bytes for the same prompt (tiny_cache)
    cached = load_file(str(tiny_cache / "text" / "validation.safetensors"))["prompt_embeds"]
    assert torch.equal(embeds[0], cached[0])


def test_resume_reuses_the_stored_embeddings_without_the_text_encoder(cli, bare_cache, new_prompt_run, tmp_path,
                                                                       monkeypatch):
    import cogtune.models.loading as loading

    run, code, stderr = new_prompt_run
    assert code == 0, stderr
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    before = (resumed / RUN_FILE).read_bytes()
    loads = []

    def unavailable(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the text encoder was loaded on resume")

    monkeypatch.setattr(loading, "load_text_encoder", unavailable)
    monkeypatch.setattr(loading, "load_tokenizer", unavailable)
    result = _train(cli, bare_cache, resumed, "--steps", "4", "--resume", "latest", "--validation-every", "1",
                    "--checkpoint-every", "1", "--validation-prompt", CACHED_PROMPT, "--validation-prompt", LONG_PROMPT)
    assert result.exit_code == 0, result.stderr
    assert loads == []
    assert (resumed / "validation" / "step-000003" / "01.mp4").is_file()
    assert (resumed / RUN_FILE).read_bytes() == before


def test_a_model_without_text_encoder_is_refused_before_weights_load(cli, bare_cache, tiny_model_dir, tmp_path):
    model = tmp_path / "no-text-encoder"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    result = _train(cli, bare_cache, tmp_path / "run", "--steps", "1", "--validation-prompt", "B new prompt",
                    model=model)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "validation prompt 'B new prompt' is not in the cache" in line and "no text encoder" in line
    assert not (tmp_path / "run").exists()


def test_an_empty_validation_prompt_is_refused(cli, tiny_cache, tmp_path):
    result = _train(cli, tiny_cache, tmp_path / "run", "--steps", "1", "--validation-prompt", CACHED_PROMPT,
                    "--validation-prompt", "  ")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "validation prompt 2 is empty" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_embed_once_and_render_the_new_prompts(bare_cache, new_prompt_run, tmp_path):
    """DDP on 2 CPU processes: the main one embeds and writes the run's file, the other waits for it;
    both render (one prompt each) and the embeddings are one process's."""
    from tests.distributed.conftest import write_accelerate_config
    from tests.distributed.forked import forked_launch

    run, code, stderr = new_prompt_run
    assert code == 0, stderr
    config = write_accelerate_config(tmp_path, "ddp", gpus=2)
    log = forked_launch(config, "train", "t2v", "--model", "tiny", "--data", bare_cache, "--output-dir",
                        tmp_path / "two", "--rank", "4", "--steps", "1", "--validation-steps", "1",
                        "--checkpoint-every", "0", "--validation-prompt", CACHED_PROMPT, "--validation-prompt",
                        LONG_PROMPT, log=tmp_path / "launch.log").finish()
    assert log.count("embedding 2 validation prompts") == 1
    assert (tmp_path / "two" / "validation" / "final" / "01.mp4").is_file()
    prompts, embeds = _stored(tmp_path / "two")
    assert prompts == [CACHED_PROMPT, LONG_PROMPT]
    assert torch.equal(embeds, _stored(run)[1])
