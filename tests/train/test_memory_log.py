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
    assert figures["max_rss_gib"] >= figures["rss_gib"]


def test_a_torch_without_host_stats_records_rss_alone(monkeypatch):
    def missing():
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "host_memory_stats", missing)
    assert set(memory._host_figures()) == {"rss_gib", "max_rss_gib"}


GIB = 1024**3


def test_the_peak_rss_is_never_below_an_rss_it_was_taken_over(monkeypatch):
    """The kernel's high-water mark (`ru_maxrss`) is updated lazily and can trail the RSS just read (the
    README's `train --model tiny` once showed RSS 0.588 GiB beside a peak of 0.587): every record's peak
    is at least its own RSS and every earlier record's peak, in the JSON and the table alike."""
    readings = iter([(0.588, 0.587), (0.300, 0.587), (0.700, 0.650), (0.100, 0.650)])  # (RSS, ru_maxrss) in GiB
    current = {}

    def rss_bytes():
        current["rss"], current["peak"] = next(readings)
        return int(current["rss"] * GIB)

    monkeypatch.setattr(memory, "_rss_bytes", rss_bytes)
    monkeypatch.setattr(memory, "_max_rss_bytes", lambda: int(current["peak"] * GIB))
    log = memory.MemoryLog("cpu")
    for moment in memory.MOMENTS:
        log.record(moment)
    figures = [(values["rss_gib"], values["max_rss_gib"]) for values in log.records.values()]
    assert figures == [(0.588, 0.588), (0.3, 0.588), (0.7, 0.7), (0.1, 0.7)]


def test_a_real_records_peak_rss_is_at_least_its_rss():
    log = memory.MemoryLog("cpu")
    grown = bytearray(64 * 1024**2)  # touched pages: the RSS grows between the records
    first = log.record("memory_before_training")
    grown[::4096] = b"\x01" * len(grown[::4096])
    second = log.record("memory_after_testing")
    for values in (first, second):
        assert values["max_rss_gib"] >= values["rss_gib"] > 0
    assert second["max_rss_gib"] >= first["max_rss_gib"]
