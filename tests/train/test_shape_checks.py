"""Training checks every bucket and the validation shape against the model's limits before loading weights."""

from __future__ import annotations


def test_train_refuses_a_validation_size_too_large(cli, family_cache, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[validation]\nprompts = ["A red circle moves left."]\nheight = 192\n')
    result = cli("train", "t2v", "--model", "tiny-1.5", "--data", family_cache("tiny-1.5"), "--config", config,
                 "--output-dir", tmp_path / "run", "--steps", "1")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "validation: 192x64 exceeds tiny-1.5's largest size 128x128" in line
    assert not (tmp_path / "run").exists()
