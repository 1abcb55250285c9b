"""DDP with a quantized base: each of 2 processes (forked, gloo) quantizes its own copy of the frozen base.

The processes load the trainable transformer as a run does (`load_trainable_transformer`, then the frozen
weights left out of DDP's synchronisation as the trainer leaves them, then torch's `DistributedDataParallel`,
which is what accelerate's `prepare` wraps a model in). Oracles, from torch: on the same input the two
copies give bit-identical outputs (the quantization is deterministic, so nothing needs broadcasting); on
different inputs DDP's gradients are the mean of the two processes' own (`no_sync`) gradients, bit for bit
(DDP divides each by 2, exact in binary floating point, and gloo sums two values, which is commutative).

The processes end as multiprocessing ends its forked children (`os._exit`), tearing nothing down: freeing
a gloo process group (DDP's reducer holds it past `destroy_process_group`) joins gloo's worker thread while
holding the GIL, and that thread may need the GIL to free its last work. That deadlock was seen in a
pytest-xdist worker that had trained in-process before it forked; it hung the whole suite.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time

import pytest
import torch
import torch.multiprocessing

from cogtune.train import TrainConfig
from cogtune.train.config import LoraConfig, MemoryConfig
from tests.ports import free_port

TIMEOUT = 300  # seconds; the processes take about 10 on 2 busy cores
STORAGES = (("nf4", "bitsandbytes"), ("nf4", "torchao"), ("int8", "auto"))


def _inputs(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(1, 32, 32, generator=generator),
                timestep=torch.tensor([400]), return_dict=False)


def _process(rank: int, port: int, configs: list, plan, folder) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from cogtune.train.model import ignore_frozen_weights_in_ddp, load_trainable_transformer

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=TIMEOUT))
    for index, config in enumerate(configs):
        transformer, _ = load_trainable_transformer(config, plan, "cpu", "no")
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:  # the same non-zero B on both (seeded), so that A gets a gradient
                parameter.data.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
        ignore_frozen_weights_in_ddp(transformer)
        model = DistributedDataParallel(transformer)
        trained = [p for p in transformer.parameters() if p.requires_grad]
        with torch.no_grad():
            same = transformer(**_inputs(0))[0]
        with model.no_sync():
            model(**_inputs(1 + rank))[0].square().mean().backward()
        own = [p.grad.clone() for p in trained]
        model.zero_grad()
        model(**_inputs(1 + rank))[0].square().mean().backward()
        torch.save({"same": same, "own": own, "synced": [p.grad for p in trained]}, folder / f"{index}-rank{rank}.pt")
    torch.distributed.barrier()  # neither process leaves while the other still exchanges with it
    os._exit(0)  # (see the module's docstring)


def test_each_process_quantizes_its_own_copy_and_ddp_averages_the_lora_gradients(tiny_cache, tmp_path):
    from cogtune.train.plan import plan_run

    base = TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"), lora=LoraConfig(rank=4))
    configs = [dataclasses.replace(base, memory=MemoryConfig(base_weights=kind, nf4_backend=backend))
               for kind, backend in STORAGES]
    processes = torch.multiprocessing.start_processes(_process, args=(free_port(), configs, plan_run(base), tmp_path),
                                                      nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + TIMEOUT
    while not processes.join(timeout=1):  # (raises if a process failed)
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the 2 processes did not finish in {TIMEOUT} s")
    for index, storage in enumerate(STORAGES):
        first, second = (torch.load(tmp_path / f"{index}-rank{rank}.pt") for rank in (0, 1))
        assert torch.equal(first["same"], second["same"]), storage
        assert len(first["synced"]) == 16
        for own_first, own_second, synced_first, synced_second in zip(first["own"], second["own"], first["synced"],
                                                                      second["synced"]):
            assert not torch.equal(own_first, own_second), storage  # the processes saw different inputs
            assert torch.equal(synced_first, synced_second) and torch.equal(synced_first, (own_first + own_second) / 2)
