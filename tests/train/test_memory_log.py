"""The host side of the trainer's memory records on a GPU: RSS and torch's pinned allocator."""

from __future__ import annotations

import torch

from cogtune.train import memory


def test_a_gpu_record_carries_the_pinned_allocators_figures(monkeypatch):
    stats = {"allocated_bytes.current": 3 * 1024**3, "allocated_bytes.peak": 5 * 1024**3, "active_bytes.current": 1}
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: stats)
    figures = memory._host_figures()
    assert figures["pinned_gib"] == 3.0 and figures["max_pinned_gib"] == 5.0
    with open("/proc/self/status", encoding="ascii") as handle:  # the kernel's own figure for this process
        rss = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))
    assert abs(figures["rss_gib"] - rss / 1024**3) < 0.05
    assert figures["max_rss_gib"] >= figures["rss_gib"] - 0.001


def test_a_torch_without_host_stats_records_rss_alone(monkeypatch):
    def missing():
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "host_memory_stats", missing)
    assert set(memory._host_figures()) == {"rss_gib", "max_rss_gib"}
