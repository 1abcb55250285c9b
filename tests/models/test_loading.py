"""Resolving MODEL arguments (configs only) and loading components, random weights included."""

from __future__ import annotations

import pytest
import torch

from cogtune.errors import ModelError
from cogtune.models.loading import ResolvedModel, load_transformer, resolve_model
from cogtune.models.registry import PRESETS, TINY_PRESETS


def test_preset_resolves_to_its_hub_id_without_network():
    model = resolve_model("cogvideox-5b")
    assert (model.source, model.location, model.spec.name) == ("hub", "THUDM/CogVideoX-5b", "cogvideox-5b")


def test_known_hub_id_uses_the_registry():
    model = resolve_model("THUDM/CogVideoX-2b")
    assert model.spec.family == "1.0-sincos" and model.source == "hub"


def test_random_weights_never_download():
    model = resolve_model("cogvideox1.5-5b-i2v", random_weights=True)
    assert model.source == "random" and model.location is None and model.spec.uses_ofs


def test_local_folder_is_read_from_its_configs(tiny_model_dir):
    model = resolve_model(str(tiny_model_dir))
    assert model.source == "local"
    assert model.spec.family == TINY_PRESETS["tiny"].family
    assert model.spec.name == "tiny"


def test_tiny_name_builds_the_folder():
    model = resolve_model("tiny-1.5-i2v")
    assert model.source == "tiny" and model.spec.uses_ofs


@pytest.mark.parametrize(("reference", "message"), [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("", "empty model reference"),
])
def test_unknown_references_are_clear(reference, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(reference)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub read it (at import): the download is asked of the cache only."""
    import huggingface_hub
    from huggingface_hub import constants

    asked = []
    download = huggingface_hub.hf_hub_download

    def recording_download(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return download(*args, **kwargs)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not read model_index.json of 'someone/not-cached'"):
        resolve_model("someone/not-cached")
    assert asked == [True]


def test_random_weights_keep_the_architecture_and_the_computed_buffers():
    spec = TINY_PRESETS["tiny"]
    random_model = ResolvedModel("tiny", spec, "random", None)
    transformer = load_transformer(random_model, dtype=torch.float32, device="cpu")
    reference = load_transformer(resolve_model("tiny"), dtype=torch.float32, device="cpu")
    assert transformer.config.num_layers == reference.config.num_layers
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in transformer.parameters())
    # The sincos table is computed at construction, not random: materializing must keep it.
    torch.testing.assert_close(transformer.patch_embed.pos_embedding.double(),
                               reference.patch_embed.pos_embedding.double(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(transformer.proj_out.weight, reference.proj_out.weight)


def test_random_weights_are_materialized_in_the_requested_dtype():
    random_model = ResolvedModel("tiny-rotary", TINY_PRESETS["tiny-rotary"], "random", None)
    transformer = load_transformer(random_model, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}


def test_preset_hub_load_offline_fails_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = resolve_model("cogvideox-2b")
    with pytest.raises(ModelError) as info:
        load_transformer(model)
    assert "could not load the transformer of 'cogvideox-2b'" in info.value.message
    assert "--random-weights" in info.value.hint
    assert PRESETS["cogvideox-2b"].hub_id in info.value.hint
