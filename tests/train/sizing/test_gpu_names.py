"""Device names as torch reports them (`torch.cuda.get_device_name()`) map onto the table of GPUs."""

from __future__ import annotations

import pytest

from cogtune.train.sizing.fit import GPUS, gpu_from_device_name


@pytest.mark.parametrize(("device_name", "gpu"), [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA GeForce RTX 4080", "RTX 4080"),
    ("Tesla T4", "T4"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA RTX A6000", "A6000"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA A10G", "A10G"),
])
def test_real_device_names_find_their_gpu(device_name, gpu):
    assert gpu in GPUS
    assert gpu_from_device_name(device_name) == gpu


@pytest.mark.parametrize("device_name", [
    "NVIDIA L40",  # not an L40S
    "NVIDIA A10",  # not an A10G, nor an A100
    "NVIDIA RTX 6000 Ada Generation",  # not an A6000
    "NVIDIA GeForce RTX 3080",
    "NVIDIA GH200 480GB",
    "",
])
def test_other_device_names_match_nothing(device_name):
    assert gpu_from_device_name(device_name) is None
