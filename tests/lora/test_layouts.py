"""Converting between LoRA layouts keeps every layer's delta, and each layout's own loader applies it
at the trained strength.

The oracle is diffusers: it loads cogtune's original file (alpha != rank, in its metadata) and fuses
it; the weight changes are the trained deltas. The converted files are read by minimal readers
written here from each layout's published rules (ComfyUI's comfy/lora.py, kohya, THUDM's SAT
mixin), which know nothing of diffusers' metadata.
"""

from __future__ import annotations

import re

import pytest

from tests.lora.conftest import ALL_LINEARS, ALPHA, ATTENTION, FAMILIES, RANK, diffusers_deltas

TOLERANCE = 1e-6


def _product(up, down):
    up, down = up.double(), down.double()
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])


def _assert_same_deltas(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    for name, delta in expected.items():
        error = (found[name].double() - delta).norm() / delta.norm()
        assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


# --- minimal readers, one per layout, none reading diffusers' lora_adapter_metadata -------------------
def read_diffusers_without_metadata(state: dict) -> dict:
    """What diffusers before 0.34 (and kijai's wrapper on it) does: alpha = rank, a scale of 1."""
    deltas = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[len("transformer."):-len(".lora_A.weight")]
            deltas[name + ".weight"] = _product(state[key.replace("lora_A", "lora_B")], down)
    return deltas


def _with_alpha_tensors(state: dict, prefix: str, to_weight) -> dict:
    """ComfyUI's and kohya's rule: scale = alpha / rank with an `.alpha` tensor, 1 without."""
    deltas = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            name = key[len(prefix):-len(".lora_down.weight")]
            alpha = state.get(f"{prefix}{name}.alpha")
            scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
            deltas[to_weight(name)] = scale * _product(state[key.replace("lora_down", "lora_up")], down)
    return deltas


# ComfyUI's native CogVideoX transformer (comfy/ldm/cogvideo/model.py): module attributes of
# CogVideoXTransformer3DModel and CogVideoXBlock, and the diffusers modules holding the same weight.
COMFY_NATIVE_BLOCK = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "attn_out": "attn1.to_out.0",
                      "ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2", "norm1.linear": "norm1.linear",
                      "norm2.linear": "norm2.linear"}
COMFY_NATIVE_TOP = {"patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
                    "time_embedding_linear_1": "time_embedding.linear_1",
                    "time_embedding_linear_2": "time_embedding.linear_2",
                    "ofs_embedding_linear_1": "ofs_embedding.linear_1",
                    "ofs_embedding_linear_2": "ofs_embedding.linear_2",
                    "norm_out.linear": "norm_out.linear", "proj_out": "proj_out"}


def comfy_native_weights(config: dict) -> set[str]:
    """The `.weight`s of the Linear/Conv layers of ComfyUI's native transformer built with `config`."""
    names = {f"blocks.{i}.{m}.weight" for i in range(config["num_layers"]) for m in COMFY_NATIVE_BLOCK}
    top = set(COMFY_NATIVE_TOP)
    if not config.get("ofs_embed_dim"):
        top -= {"ofs_embedding_linear_1", "ofs_embedding_linear_2"}
    return names | {f"{m}.weight" for m in top}


def _comfy_to_diffusers(native: str) -> str:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", native)
    if match:
        return f"transformer_blocks.{match[1]}.{COMFY_NATIVE_BLOCK[match[2]]}.weight"
    return f"{COMFY_NATIVE_TOP[native]}.weight"


def read_comfyui(state: dict) -> dict:
    return _with_alpha_tensors(state, "diffusion_model.", _comfy_to_diffusers)


def read_kohya(state: dict, module_names: list[str]) -> dict:
    underscored = {name.replace(".", "_"): name for name in module_names}
    return _with_alpha_tensors(state, "lora_unet_", lambda name: underscored[name] + ".weight")


def read_sat(state: dict) -> dict:
    """SAT's LoRA mixin: per q/k/v partition of query_key_value (and dense), scale lora_alpha / r with
    its default lora_alpha = 1 (THUDM CogVideo tools/load_cogvideox_lora.py)."""
    parts = {"query_key_value": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "dense": ("attn1.to_out.0",)}
    deltas = {}
    for key, down in state.items():
        match = re.fullmatch(r"model\.diffusion_model\.transformer\.layers\.(\d+)\.attention\.(\w+)\.matrix_A\.(\d)", key)
        if match:
            up = state[key.replace("matrix_A", "matrix_B")]
            if down.any() or up.any():
                name = f"transformer_blocks.{match[1]}.{parts[match[2]][int(match[3])]}.weight"
                deltas[name] = _product(up, down) / down.shape[0]
    return deltas


def _module_names(preset: str) -> list[str]:
    from tests.lora.conftest import base_transformer

    return [name for name, _ in base_transformer(preset).named_modules()]


def _read_as_its_loader(layout: str, state: dict, preset: str) -> dict:
    if layout == "diffusers":
        return read_diffusers_without_metadata(state)
    if layout == "comfyui":
        return read_comfyui(state)
    if layout == "kohya":
        return read_kohya(state, _module_names(preset))
    return read_sat(state)


def _targets(layout: str):
    return ATTENTION if layout == "sat" else ALL_LINEARS  # SAT's LoRA mixin adapts attention only


# --- the tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "kohya", "sat"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_round_trip_keeps_every_delta_rank_and_alpha(tmp_path, trained_lora, preset, layout):
    from cogtune.lora.layouts import convert_lora, inspect_lora

    original, expected = trained_lora(preset, _targets(layout))
    converted = tmp_path / f"{layout}.safetensors"
    convert_lora(original, converted, layout)
    back = tmp_path / "back.safetensors"
    convert_lora(converted, back, "diffusers")
    _assert_same_deltas(diffusers_deltas(preset, back), expected)  # diffusers loads the round trip
    for path in (converted, back):
        report = inspect_lora(path)
        assert report["ranks_alphas"] == [{"rank": RANK, "alpha": ALPHA, "layers": len(expected)}]
        assert report["alpha_portable"]


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "kohya", "sat"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-1.5-i2v"])
def test_each_layout_applies_at_the_trained_strength_without_diffusers_metadata(tmp_path, trained_lora, preset,
                                                                                 layout):
    from safetensors.torch import load_file

    from cogtune.lora.layouts import convert_lora

    original, expected = trained_lora(preset, _targets(layout))
    target = tmp_path / "converted.safetensors"
    convert_lora(original, target, layout)
    _assert_same_deltas(_read_as_its_loader(layout, load_file(target), preset), expected)


def test_cogtunes_own_file_needs_the_metadata_the_converted_one_does_not(trained_lora):
    """The problem converting solves: alpha != rank is lost by loaders that ignore the header."""
    from safetensors.torch import load_file

    original, expected = trained_lora("tiny")
    found = read_diffusers_without_metadata(load_file(original))
    name = next(iter(expected))
    assert abs(found[name].norm() / expected[name].norm() - RANK / ALPHA) < 1e-6


@pytest.mark.parametrize("preset", FAMILIES)
def test_comfyui_keys_name_weights_of_comfyuis_native_transformer(tmp_path, trained_lora, preset):
    from safetensors.torch import load_file

    from cogtune.lora.layouts import convert_lora
    from cogtune.models.registry import TINY_PRESETS

    original, expected = trained_lora(preset)
    target = tmp_path / "comfy.safetensors"
    convert_lora(original, target, "comfyui")
    weights = comfy_native_weights(dict(TINY_PRESETS[preset].transformer_config))
    keys = list(load_file(target))
    modules = {re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", key) for key in keys}
    assert all(key.startswith("diffusion_model.") for key in keys)
    assert {m[len("diffusion_model."):] + ".weight" for m in modules} <= weights
    assert len(modules) == len(expected) == len(weights)  # every Linear of the model, each a native target
    assert len(keys) == 3 * len(modules)


def test_kohya_block_keys_name_no_weight_of_comfyuis_native_transformer(tmp_path, trained_lora, cli):
    """ComfyUI's loader maps `lora_unet_<native weight, underscored>`: kohya's diffusers names in the blocks
    (`transformer_blocks_N_attn1_to_q`) match none of them, so native ComfyUI drops them, and convert says so."""
    from safetensors.torch import load_file

    from cogtune.models.registry import TINY_PRESETS

    original, _ = trained_lora("tiny")
    target = tmp_path / "kohya.safetensors"
    result = cli("lora", "convert", str(original), str(target), "--to", "kohya")
    assert result.exit_code == 0, result.stderr
    assert "not native ComfyUI" in result.stderr and "--to comfyui" in result.stderr
    native = {name.removesuffix(".weight").replace(".", "_")
              for name in comfy_native_weights(dict(TINY_PRESETS["tiny"].transformer_config))}
    modules = {re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", key).removeprefix("lora_unet_")
               for key in load_file(target)}
    blocks = {m for m in modules if m.startswith("transformer_blocks_")}
    assert blocks and not blocks & native
    comfy = tmp_path / "comfy.safetensors"
    result = cli("lora", "convert", str(original), str(comfy), "--to", "comfyui")
    assert result.exit_code == 0 and "native ComfyUI's LoRA loader" in result.stderr
    shown = cli("lora", "inspect", str(target))
    assert "VideoX-Fun" in shown.stdout + shown.stderr


def test_sat_files_read_with_sats_default_alpha_and_fused_qkv(tmp_path, trained_lora):
    """A SAT LoRA as THUDM's trainer writes it (alpha not stored, q/k/v partitions) reads at 1/rank."""
    import torch
    from safetensors.torch import save_file

    from cogtune.lora.layouts import inspect_lora, read_lora

    torch.manual_seed(0)
    state = {}
    for block in range(2):
        for name, parts in (("query_key_value", 3), ("dense", 1)):
            for p in range(parts):
                state[f"model.diffusion_model.transformer.layers.{block}.attention.{name}.matrix_A.{p}"] = torch.randn(8, 32)
                state[f"model.diffusion_model.transformer.layers.{block}.attention.{name}.matrix_B.{p}"] = torch.randn(32, 8)
    path = tmp_path / "sat.safetensors"
    save_file(state, path)
    lora = read_lora(path)
    assert lora.layout == "sat" and len(lora.layers) == 8
    _assert_same_deltas({f"{m}.weight": layer.delta() for m, layer in lora.layers.items()}, read_sat(state))
    report = inspect_lora(path)
    assert report["ranks_alphas"] == [{"rank": 8, "alpha": 1.0, "layers": 8}]
    assert report["alpha_form"] == "assumed" and not report["alpha_portable"]
    assert "tiny" in report["fits"]


def test_sat_cannot_hold_feed_forward_layers(tmp_path, trained_lora):
    from cogtune.errors import ConfigError
    from cogtune.lora.layouts import convert_lora

    original, _ = trained_lora("tiny")
    with pytest.raises(ConfigError, match="SAT's LoRA mixin adapts attention"):
        convert_lora(original, tmp_path / "sat.safetensors", "sat")
    assert not (tmp_path / "sat.safetensors").exists()


def test_kohya_files_with_comfyuis_native_names_are_read(tmp_path, trained_lora):
    """ComfyUI also maps `lora_unet_<native module, underscored>`; such files read as kohya."""
    from safetensors.torch import load_file, save_file

    from cogtune.lora.layouts import convert_lora, read_lora

    original, expected = trained_lora("tiny-1.5-i2v")
    comfy = tmp_path / "comfy.safetensors"
    convert_lora(original, comfy, "comfyui")
    renamed = {}
    for key, tensor in load_file(comfy).items():
        module, suffix = re.fullmatch(r"diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key).groups()
        renamed[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = tensor
    save_file(renamed, tmp_path / "native_kohya.safetensors")
    lora = read_lora(tmp_path / "native_kohya.safetensors")
    assert lora.layout == "kohya"
    _assert_same_deltas({f"{m}.weight": layer.delta() for m, layer in lora.layers.items()}, expected)


def test_unknown_files_and_layouts_are_one_line_errors(tmp_path, trained_lora):
    import torch
    from safetensors.torch import save_file

    from cogtune.errors import ConfigError, DataError
    from cogtune.lora.layouts import convert_lora, read_lora

    original, _ = trained_lora("tiny")
    with pytest.raises(ConfigError, match="unknown LoRA layout 'onnx'"):
        convert_lora(original, tmp_path / "x.safetensors", "onnx")
    with pytest.raises(ConfigError, match="unknown LoRA layout 'lycoris'"):
        read_lora(original, "lycoris")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(DataError, match="is not a safetensors file"):
        read_lora(text)
    weights = tmp_path / "transformer.safetensors"
    save_file({"proj_out.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(DataError, match="not a CogVideoX LoRA in a known layout"):
        read_lora(weights)
    with pytest.raises(DataError, match="LoRA weights not found"):
        read_lora(tmp_path / "missing")
