"""Memory figures at the four moments of the CogVideoX factory's memory tables (before training, before and after validation, after testing), for GPUs and (as RSS) for CPUs."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from cogtune import report
from cogtune.fsutil import atomic_write_text

MOMENTS = ("memory_before_training", "memory_before_validation", "memory_after_validation", "memory_after_testing")
GIB = 1024**3


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_figures() -> dict[str, float]:
    """The process's RSS now and its peak so far, in GiB, from bytes and rounded alike.

    The peak is read after the RSS and is never below it: the kernel's high-water mark
    (`ru_maxrss`) is updated lazily, so on its own it can trail the RSS just read."""
    rss = _rss_bytes()
    peak = max(_max_rss_bytes(), rss)
    return {"rss_gib": round(rss / GIB, 3), "max_rss_gib": round(peak / GIB, 3)}


def snapshot(device: Any) -> dict[str, Any]:
    """Current and peak memory of `device` in GiB (CUDA: allocated and reserved; CPU: RSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "device": torch.cuda.get_device_name(device),
            "allocated_gib": round(torch.cuda.memory_allocated(device) / GIB, 3),
            "reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 3),
            "max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
            **_host_figures(),
        }
    return {"device": device.type, **_rss_figures()}


def _host_figures() -> dict[str, float]:
    """The host side of a GPU run: the process's RSS (now and peak) and what torch's pinned allocator
    holds (`torch.cuda.host_memory_stats`, where this torch has it: now and peak)."""
    figures = _rss_figures()
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return figures
    if "allocated_bytes.current" in stats:
        figures["pinned_gib"] = round(stats["allocated_bytes.current"] / GIB, 3)
        figures["max_pinned_gib"] = round(stats.get("allocated_bytes.peak", 0) / GIB, 3)
    return figures


class MemoryLog:
    """Records the snapshots and writes them as `memory.json` and a table."""

    def __init__(self, device: Any):
        self.device = device
        self.records: dict[str, dict[str, Any]] = {}

    def record(self, moment: str) -> dict[str, Any]:
        figures = snapshot(self.device)
        if "max_rss_gib" in figures:  # a peak is never below a figure it was taken over, at an earlier moment too
            earlier = [values["max_rss_gib"] for values in self.records.values()]
            figures["max_rss_gib"] = max([figures["max_rss_gib"], *earlier])
        self.records[moment] = figures
        return figures

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.records, indent=2) + "\n")

    def print_table(self) -> None:
        if not self.records:
            return
        first = next(iter(self.records.values()))
        if "allocated_gib" in first:
            columns = ["moment", "allocated GiB", "reserved GiB", "peak allocated GiB", "peak reserved GiB"]
            keys = ("allocated_gib", "reserved_gib", "max_allocated_gib", "max_reserved_gib")
        else:
            columns = ["moment", "RSS GiB", "peak RSS GiB"]
            keys = ("rss_gib", "max_rss_gib")
        rows = [[moment, *(values.get(k) for k in keys)] for moment, values in self.records.items()]
        report.table(f"memory ({first['device']})", columns, rows)
