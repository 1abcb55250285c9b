"""`cogtune bench memory --breakdown`: each peak in its parts, in the table, the JSON and the chart."""

from __future__ import annotations

import json


def test_breakdown_table_json_and_chart(cli, tmp_path):
    result = cli("bench", "memory", "--model", "tiny", "--rank", "4", "--offload-activations", "on,off", "--estimate",
                 "--breakdown", "--gpu-memory", "24", "--json", tmp_path / "m.json", "--plot", tmp_path / "m.png",
                 "--markdown", tmp_path / "m.md")
    assert result.exit_code == 0, result.stderr
    # a narrow terminal wraps part names ("allocator" / "slack") within their cell
    assert "parts (GiB)" in result.stdout and "allocator" in result.stdout and "slack" in result.stdout
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["host_memory_gib"] > 0
    rows = document["rows"]
    assert len(rows) == 2
    for row in rows:
        for moment, parts in row["breakdown_gib"].items():
            assert round(sum(parts.values()) * 1000) == round(row["memory_gib"][moment] * 1000)
        assert row["host_fits"] is True and row["fits"] is True
    hosts = sorted(row["host_ram_gib"] for row in rows)
    assert hosts[0] == 0.0
    offloading = next(row for row in rows if row["case"]["offload_activations"])
    assert sum(offloading["host_ram_breakdown_gib"].values()) == offloading["host_ram_gib"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    # the markdown: each row's training peak and peak with validation in their parts, the same figures
    text = (tmp_path / "m.md").read_text()
    parts_table = text[text.index("#### Each peak in its parts (GiB)"):].splitlines()
    header = [cell.strip() for cell in parts_table[2].strip("|").split("|")]
    first = [cell.strip() for cell in parts_table[4].strip("|").split("|")]
    assert header[:2] == ["configuration", "peak"] and header[-1] == "total" and "allocator slack" in header
    assert first[1] == "before validation"
    assert float(first[-1]) == rows[0]["memory_gib"]["before_validation"]
    assert round(sum(float(cell) for cell in first[2:-1]) * 1000) == round(float(first[-1]) * 1000)


def test_host_memory_too_small_means_no_fit(tmp_path):
    from cogtune.bench.run import BenchConfig, run_bench

    (row,) = run_bench(BenchConfig(models=("tiny",), offload_activations=(True,), gpu_memory=24, host_memory=1e-9,
                                   validation=False))
    assert row["gpu_fits"] is True and row["host_fits"] is False and row["fits"] is False
