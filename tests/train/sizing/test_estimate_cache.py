"""Estimates kept on disk: a hit is the identical estimate; anything that changes memory misses."""

from __future__ import annotations

import dataclasses

import pytest

from cogtune.train.sizing import cache
from cogtune.train.sizing import estimate as estimate_module
from tests.train.sizing.test_estimate import run


@pytest.fixture
def traced(monkeypatch, tmp_path):
    """The configurations actually traced (the cache's misses), in a cache of this test's own."""
    monkeypatch.setenv("COGTUNE_HOME", str(tmp_path))
    calls = []
    real = estimate_module.estimate_run

    def recording(config, shapes, validation_shape=None):
        calls.append(config)
        return real(config, shapes, validation_shape)

    monkeypatch.setattr(estimate_module, "estimate_run", recording)
    return calls


def test_a_hit_is_the_identical_estimate_and_a_changed_setting_misses(traced, tmp_path):
    config = run(**{"lora.rank": 8})
    first = cache.cached_estimate(config, [(9, 64, 64)])
    again = cache.cached_estimate(config, [(9, 64, 64)])
    assert again == first and again is not first  # read back from disk: every figure, part and count
    assert len(traced) == 1 and len(list((tmp_path / "estimates").glob("*.json"))) == 1
    # settings that change no tensor: the same entry (a bench row and the trainer's pre-flight share it)
    elsewhere = dataclasses.replace(config, output_dir="/elsewhere", seed=7, random_weights=False)
    assert cache.cached_estimate(elsewhere, [(9, 64, 64)]).memory == first.memory
    assert len(traced) == 1
    # a memory-relevant setting, another shape, a validation pass, --no-cache: traced again
    cache.cached_estimate(run(**{"lora.rank": 16}), [(9, 64, 64)])
    cache.cached_estimate(config, [(9, 64, 96)])
    cache.cached_estimate(config, [(9, 64, 64)], (9, 64, 64))
    cache.cached_estimate(config, [(9, 64, 64)], use_cache=False)
    assert len(traced) == 5


def test_the_key_holds_the_versions_and_the_model(monkeypatch):
    import torch

    config = run()
    key = cache.estimate_key(config, [(9, 64, 64)], None)
    cache._versions.cache_clear()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    try:
        assert cache.estimate_key(config, [(9, 64, 64)], None) != key
    finally:
        monkeypatch.undo()
        cache._versions.cache_clear()
    assert cache.estimate_key(config, [(9, 64, 64)], None) == key
    shrunk = dataclasses.replace(estimate_module.model_spec("tiny"), transformer_config={
        **estimate_module.model_spec("tiny").transformer_config, "num_layers": 3})
    monkeypatch.setattr(cache, "model_spec", lambda reference: shrunk)
    assert cache.estimate_key(config, [(9, 64, 64)], None) != key  # a local folder's configs, changed


def test_an_unreadable_entry_is_a_miss(traced, tmp_path):
    config = run(**{"lora.rank": 8})
    first = cache.cached_estimate(config, [(9, 64, 64)])
    (entry,) = (tmp_path / "estimates").glob("*.json")
    entry.write_text('{"key": ')  # cut short
    again = cache.cached_estimate(config, [(9, 64, 64)])
    assert len(traced) == 2 and dataclasses.replace(again, seconds=first.seconds) == first  # traced anew
    assert cache.cached_estimate(config, [(9, 64, 64)]) == again and len(traced) == 2  # and rewritten whole
