"""`cogtune lora inspect|convert|merge` from the command line, and `train --save-format`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.lora.conftest import ALPHA, ATTENTION, RANK, write_trained_lora


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A LoRA on the attention of `tiny` (alpha != rank), as a run folder would hold it."""
    folder = tmp_path_factory.mktemp("run")
    write_trained_lora(folder, "tiny", ATTENTION)
    return folder


def test_inspect_a_run_folder_as_json(cli, tiny_lora):
    result = cli("lora", "inspect", tiny_lora, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"] == "diffusers" and report["model"] == "tiny" and report["family"] == "1.0-sincos"
    assert report["ranks_alphas"] == [{"rank": RANK, "alpha": ALPHA, "layers": 8}]
    assert report["alpha_form"] == "metadata" and report["alpha_portable"] is False
    assert report["target_modules"] == ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v"]
    assert report["buckets"] == ["9x64x64"]
    assert len(report["per_layer"]) == 8 and report["per_layer"][0]["module"] == "transformer_blocks.0.attn1.to_k"


@pytest.mark.parametrize("layout", ["comfyui", "kohya", "diffusers", "sat"])
def test_convert_then_inspect_reports_the_same_rank_and_alpha(cli, tiny_lora, tmp_path, layout):
    target = tmp_path / f"{layout}.safetensors"
    result = cli("lora", "convert", tiny_lora, target, "--to", layout)
    assert result.exit_code == 0, result.stderr
    assert f"diffusers -> {layout}" in result.stdout + result.stderr
    report = json.loads(cli("lora", "inspect", target, "--json").stdout)
    assert report["layout"] == layout
    assert report["ranks_alphas"] == [{"rank": RANK, "alpha": ALPHA, "layers": 8}]
    assert report["alpha_form"] == ("tensors" if layout in ("comfyui", "kohya") else "folded")
    assert report["alpha_portable"] is True
    assert report["model"] == "tiny"  # the cogtune record travels with the conversion
    human = cli("lora", "inspect", target)
    assert human.exit_code == 0 and layout in human.stdout


def test_convert_errors_are_one_line(cli, tiny_lora, tmp_path):
    target = tmp_path / "out.safetensors"
    result = cli("lora", "convert", tiny_lora, target, "--to", "onnx")
    assert result.exit_code == 1 and "unknown LoRA layout 'onnx'" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("lora", "convert", tiny_lora, target, "--to", "kohya", "--from", "comfyui")
    assert result.exit_code == 1 and "names no CogVideoX transformer module (comfyui layout)" in result.stderr
    assert "look like the diffusers layout" in result.stderr
    not_lora = tmp_path / "not_lora.safetensors"
    not_lora.write_bytes(b"\x00" * 64)
    result = cli("lora", "inspect", not_lora)
    assert result.exit_code == 1 and "not a safetensors file" in result.stderr
    assert cli("lora", "convert", tiny_lora, target, "--to", "kohya").exit_code == 0
    result = cli("lora", "convert", tiny_lora, target, "--to", "kohya")
    assert result.exit_code == 1 and "pass --overwrite" in result.stderr
    assert cli("lora", "convert", tiny_lora, target, "--to", "kohya", "--overwrite").exit_code == 0


def _frames(path):
    from cogtune.data.video import read_all_frames

    return read_all_frames(path).astype(int)


def _rounding_tolerance(steps: int) -> float:
    """Two float32 orders of the same `steps` denoising steps of `tiny` at its default clip (9x64x64)."""
    from cogtune.models.registry import TINY_PRESETS
    from tests.rounding import denoising_tolerance

    return denoising_tolerance(TINY_PRESETS["tiny"], steps, frames=9, height=64, width=64)


@pytest.mark.slow
def test_merge_then_sample_transformer_is_sample_lora(cli, tiny_lora, tmp_path, sampled):
    """The oracle: diffusers applying the LoRA at sampling time (`sample --lora --lora-scale`).

    The two differ only in the order of float32 operations (W + 0.5 BA stored, or Wx + 0.5 B(Ax)), so
    their denoised latents agree to the rounding bound of `tests.rounding`; the LoRA moves them by ~0.5.
    """
    import torch
    from diffusers import CogVideoXTransformer3DModel

    merged = tmp_path / "merged"
    result = cli("lora", "merge", "--model", "tiny", "--lora", tiny_lora, "--scale", "0.5", "--output", merged)
    assert result.exit_code == 0, result.stderr
    transformer = CogVideoXTransformer3DModel.from_pretrained(merged)
    assert transformer.dtype == torch.float32  # tiny's dtype
    common = ("sample", "--model", "tiny", "--prompt", "A red circle moves left", "--steps", "2")
    assert cli(*common, "--transformer", merged, "--output", tmp_path / "merged.mp4").exit_code == 0
    assert cli(*common, "--lora", tiny_lora, "--lora-scale", "0.5", "--output", tmp_path / "lora.mp4").exit_code == 0
    assert cli(*common, "--output", tmp_path / "base.mp4").exit_code == 0
    merged_latents, lora_latents, base_latents = sampled.latents
    scale = lora_latents.abs().max().item()
    torch.testing.assert_close(merged_latents, lora_latents, rtol=0, atol=_rounding_tolerance(2) * scale)
    assert (base_latents - lora_latents).abs().max() > 100 * _rounding_tolerance(2) * scale
    base_video, lora_video = _frames(tmp_path / "base.mp4"), _frames(tmp_path / "lora.mp4")
    assert np.abs(base_video - lora_video).mean() > 1  # the LoRA does change the video


def test_sample_takes_a_lora_in_any_layout(cli, tiny_lora, tmp_path, sampled):
    """`sample --lora` on the ComfyUI and kohya exports gives the video of the diffusers file, which
    diffusers' own `load_lora_weights` applies (the oracle). Compared on the denoised latents, to the
    rounding bound of `tests.rounding` (a converted file folds alpha into its float32 weights, one
    more rounding); the previews are still written, and show the LoRA's change."""
    import torch
    from PIL import Image

    def sheet(name):
        return np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")).astype(int)

    common = ("sample", "--model", "tiny", "--prompt", "A red circle moves left", "--steps", "2", "--lora-scale", "0.7",
              "--preview", "png")
    assert cli(*common, "--lora", tiny_lora, "--output", tmp_path / "diffusers.mp4").exit_code == 0
    assert cli(*common[:-4], "--preview", "png", "--output", tmp_path / "base.mp4").exit_code == 0
    reference, base = sampled.latents
    tolerance = _rounding_tolerance(2) * reference.abs().max().item()
    assert np.abs(sheet("base") - sheet("diffusers")).mean() > 1  # the LoRA does change the video
    assert (base - reference).abs().max() > 100 * tolerance
    for layout in ("comfyui", "kohya"):
        converted = tmp_path / f"{layout}.safetensors"
        assert cli("lora", "convert", tiny_lora, converted, "--to", layout).exit_code == 0
        result = cli(*common, "--lora", converted, "--output", tmp_path / f"{layout}.mp4")
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / f"{layout}.png").is_file()
        torch.testing.assert_close(sampled.latents[-1], reference, rtol=0, atol=tolerance, msg=lambda m: f"{layout}: {m}")


def test_sample_refuses_a_file_that_is_no_lora_before_loading_the_model(cli, tmp_path, monkeypatch):
    import cogtune.sample

    monkeypatch.setattr(cogtune.sample, "load_any_lora", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "notes.safetensors").write_text("not tensors")
    result = cli("sample", "--model", "tiny", "--prompt", "x", "--lora", tmp_path / "notes.safetensors",
                 "--output", tmp_path / "x.mp4")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "notes.safetensors is not a safetensors file" in line


def test_merge_refusals_are_one_line(cli, tiny_lora, tmp_path):
    other = tmp_path / "other"
    write_trained_lora(other, "tiny-1.5-i2v", ATTENTION)
    result = cli("lora", "merge", "--model", "tiny", "--lora", other, "--output", tmp_path / "m1")
    assert result.exit_code == 1 and "was trained for tiny-1.5-i2v" in result.stderr
    assert not (tmp_path / "m1").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    result = cli("lora", "merge", "--model", "tiny", "--lora", tiny_lora, "--output", taken)
    assert result.exit_code == 1 and "exists and is not empty" in result.stderr


def test_merge_of_a_lora_without_a_record_into_the_wrong_model(cli, tmp_path):
    """A LoRA from elsewhere (no cogtune record): the shapes decide, still in one line."""
    from safetensors.torch import load_file, save_file

    from tests.lora.conftest import ALL_LINEARS

    other = tmp_path / "other"
    write_trained_lora(other, "tiny-1.5-i2v", ALL_LINEARS)
    kohya = tmp_path / "kohya.safetensors"
    assert cli("lora", "convert", other, kohya, "--to", "kohya").exit_code == 0
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(kohya), bare)  # no header, as another trainer writes it
    assert json.loads(cli("lora", "inspect", bare, "--json").stdout)["fits"] == ["tiny-1.5-i2v"]
    result = cli("lora", "merge", "--model", "tiny", "--lora", bare, "--output", tmp_path / "m")
    assert result.exit_code == 1 and "does not fit tiny" in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()


def test_train_save_format_writes_the_other_layouts(tiny_cache, tmp_path):
    from safetensors.torch import load_file

    from cogtune.errors import ConfigError
    from cogtune.lora.layouts import read_lora
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import LoraConfig, OptimizerConfig, ValidationConfig
    from tests.lora.test_layouts import read_comfyui

    with pytest.raises(ConfigError, match="lora.save_format 'onnx'"):
        LoraConfig(save_format="diffusers,onnx")
    run = tmp_path / "run"
    run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(run), steps=1,
                             lora=LoraConfig(rank=4, alpha=8, save_format="diffusers,comfyui,kohya"),
                             optimizer=OptimizerConfig(lr=1e-3), validation=ValidationConfig(final=False)))
    original = read_lora(run / "pytorch_lora_weights.safetensors")
    comfy = read_comfyui(load_file(run / "lora_comfyui.safetensors"))
    for module, layer in original.layers.items():
        delta = layer.delta()
        assert ((comfy[f"{module}.weight"] - delta).norm() / delta.norm()) < 1e-6
    assert read_lora(run / "lora_kohya.safetensors").layout == "kohya"


def test_inspect_shows_each_layers_relative_update_against_diffusers(cli, tiny_lora):
    """The oracle: diffusers fusing the file into the transformer (`diffusers_deltas`: fused - base, float64)
    gives each layer's update; the base weights are diffusers' loading of the tiny preset."""
    from diffusers import CogVideoXTransformer3DModel

    from cogtune.models.tiny import ensure_tiny_model
    from tests.lora.conftest import diffusers_deltas

    result = cli("lora", "inspect", tiny_lora, "--json")
    assert result.exit_code == 0, result.stderr
    updates = json.loads(result.stdout)["updates"]
    assert updates["base"] is not None and updates["all_b_zero"] is False
    deltas = diffusers_deltas("tiny", tiny_lora / "pytorch_lora_weights.safetensors")
    base = CogVideoXTransformer3DModel.from_pretrained(ensure_tiny_model("tiny"), subfolder="transformer").state_dict()
    assert {row["module"] for row in updates["layers"]} == {name.removesuffix(".weight") for name in deltas}
    for row in updates["layers"]:
        weight = f"{row['module']}.weight"
        # float64 on both sides: the products differ only in summation order (~1e-15 relative).
        assert row["update_norm"] == pytest.approx(float(deltas[weight].norm()), rel=1e-9)
        assert row["relative"] == pytest.approx(float(deltas[weight].norm() / base[weight].double().norm()), rel=1e-6)

    without_base = json.loads(cli("lora", "inspect", tiny_lora, "--json", "--model", "THUDM/not-downloaded").stdout)
    assert without_base["updates"]["base"] is None and "not on this machine" in without_base["updates"]["base_note"]
    assert [row["relative"] for row in without_base["updates"]["layers"]] == [None] * len(updates["layers"])
    shown = cli("lora", "inspect", tiny_lora, "--model", "THUDM/not-downloaded")
    assert "||scale B A||" in shown.stdout and "no relative update" in shown.stdout + shown.stderr


def test_inspect_flags_a_lora_whose_b_matrices_are_all_zero(cli, tmp_path):
    """peft's default initialisation sets B = 0: such a LoRA (trained with lr 0) changes nothing."""
    from peft import LoraConfig

    from cogtune.lora.format import save_lora
    from tests.lora.conftest import base_transformer

    transformer = base_transformer("tiny")
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(ATTENTION)))
    save_lora(tmp_path, transformer, {"model": "tiny", "family": "1.0-sincos", "rank": RANK, "alpha": ALPHA})
    result = cli("lora", "inspect", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    updates = json.loads(result.stdout)["updates"]
    assert updates["all_b_zero"] is True and all(row["update_norm"] == 0 for row in updates["layers"])
    assert "warning: every B matrix of this LoRA is zero" in result.stderr
