"""One GPU's share of an FSDP2 run, against torch's own tracker of FSDP2's memory, `FSDPMemTracker`.

The oracle is the real thing: diffusers' transformer (the 5b's cut to 3 blocks, so that one block has
a block on each side) sharded with torch's `fully_shard` over a fake process group of 4 ranks, as
cogtune's FSDP launches shard it (each block a unit, then the root; blocks reshard after their
forward; parameters gathered and gradients reduced in bf16, accelerate's `MixedPrecisionPolicy` for
bf16; float32 master weights, AdamW), two training steps of cogtune's `training_step` under
`FakeTensorMode` on the CPU, with the estimator's GPU emulation (`gpu_semantics`: the flash kernel,
autocast's dtypes), watched by `FSDPMemTracker`. Its peak snapshot sorts rank 0's memory into sharded
and unsharded parameters, all-gather outputs, sharded gradients, reduce-scatter inputs, activations,
temporaries, inputs and optimizer state. A LoRA run is checked the same way on a tiny preset (built for
real and faked after: peft cannot move fake tensors), its adapters added by peft as cogtune adds them.

cogtune's share (`estimate_run(fsdp_gpus=4)`, `cogtune.train.sizing.shard`) must give:
- trainable weights = the sharded parameters, optimizer state = FSDPMemTracker's, sharded gradients =
  its sharded gradients, gathered weights = its unsharded parameters plus all-gather outputs: the same
  tensors, each part within 512 bytes per tensor (cogtune's parts are blocks of the CUDA allocator,
  rounded up to 512 bytes, and scaled from the traced bf16 blocks to float32 shards); the optimizer's
  `step` scalars (4 bytes each, on the host in a CUDA run: not in cogtune's figure) are within it;
- the peak allocated memory, less the workspaces MemTracker cannot see (cuBLAS's and the flash
  kernel's): within the recomputed block's activations and backward's temporaries of cogtune's peak.
  The two peaks can fall at different instants of the same block's backward: FSDPMemTracker sees one
  block's gradients at once (FSDP2 reduces them when the block's backward ends), the trace sees them
  as the backward makes them, beside the recomputed activations still alive; the difference is at most
  what is alive in that block's backward and not elsewhere.

The oracle's AdamW runs the for-loop implementation (`foreach=False`): with foreach over DTensors under
FakeTensorMode, FSDPMemTracker counts about 15 times the state as optimizer memory during the step,
which would put its peak in the step; the comparison is the forward and backward, where FSDP shards
and gathers (cogtune's peak here is in the backward, and its optimizer state part is the state alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
from types import MappingProxyType

import pytest
import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.checkpoint import set_checkpoint_early_stop

import cogtune.train.sizing.estimate as estimate_module
from cogtune.models.registry import ALL_PRESETS
from cogtune.train.sizing.estimate import estimate_run
from tests.train.sizing.test_estimate import run

GPUS = 4
STEP_BYTES = 4  # AdamW's `step`, a float32 scalar per parameter (on the host in a CUDA run)
CUT_5B = dataclasses.replace(ALL_PRESETS["cogvideox-5b"], transformer_config=MappingProxyType(
    {**ALL_PRESETS["cogvideox-5b"].transformer_config, "num_layers": 3}))
SHAPE = (9, 128, 128)


@pytest.fixture(scope="module")
def fake_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=GPUS)
    try:
        yield init_device_mesh("cpu", (GPUS,))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def cut_5b(monkeypatch):
    real = estimate_module.model_spec
    monkeypatch.setattr(estimate_module, "model_spec", lambda reference: CUT_5B if reference == "5b-cut3"
                        else real(reference))


def fsdp_memtracker_peak(mesh, config, spec=CUT_5B, shape=SHAPE) -> dict[str, int]:
    """FSDPMemTracker's peak snapshot of two FSDP2 training steps of `config` (full fine-tuning, or LoRA
    added by peft) on `spec`'s transformer, by category name."""
    from diffusers import CogVideoXTransformer3DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cogtune.models.loading import ResolvedModel, load_scheduler
    from cogtune.train.sizing.estimate import synthetic_batch
    from cogtune.train.sizing.trace import gpu_semantics
    from cogtune.train.step import StepSettings, training_step

    from cogtune.train.lora import add_lora

    with contextlib.ExitStack() as fake:
        if config.full:
            fake.enter_context(FakeTensorMode())
        model = CogVideoXTransformer3DModel(**spec.transformer_config)
        if not config.full:  # peft cannot move fake tensors: a small model is built for real, then faked
            model.requires_grad_(False)
            add_lora(model, config.lora)
            fake.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for block in model.transformer_blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
        scheduler = load_scheduler(ResolvedModel(config.model, spec, "fake", None))
        batch = synthetic_batch(spec, 1, shape)
        empty = torch.zeros(spec.max_text_tokens, spec.text_embed_dim)
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((batch,))
        with set_checkpoint_early_stop(False), tracker, gpu_semantics(torch.bfloat16) as cast_cache:
            for step in range(2):
                loss = training_step(model, scheduler, spec, batch, empty, StepSettings(),
                                     [torch.Generator().manual_seed(0)], torch.device("cpu"), torch.bfloat16)
                cast_cache.clear()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if step == 0:
                    tracker.reset_mod_stats()  # the second step, with the optimizer state in place
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {getattr(key, "name", key): value for key, value in peak.items()}


def sharded_estimate(config, shape=SHAPE):
    """cogtune's estimate of one GPU of 4, and that GPU's parts at its peak in the tensors' own bytes."""
    seen = {}

    def observe(transformer, tracker):
        seen["share"] = tracker.share
        return contextlib.nullcontext()

    result = estimate_run(config, [shape], None, observe=observe, fsdp_gpus=GPUS)
    return result, seen["share"].peak_requested()


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_one_gpus_share_is_fsdp2s(fake_process_group, cut_5b, checkpointing):
    config = dataclasses.replace(run("cogvideox-5b", full=True, gradient_checkpointing=checkpointing),
                                 model="5b-cut3")
    theirs = fsdp_memtracker_peak(fake_process_group, config)
    result, mine = sharded_estimate(config)
    tensors = _parameter_count(CUT_5B)
    assert mine["trainable_weights"] == pytest.approx(theirs["SHARDED_PARAM"], abs=tensors)
    assert mine["optimizer_state"] == pytest.approx(theirs["OPT"], abs=2 * tensors + STEP_BYTES * tensors)
    assert mine["gradients"] == pytest.approx(theirs["SHARDED_GRAD"], abs=tensors)
    assert mine["gathered_weights"] == theirs["UNSHARDED_PARAM"] + theirs["ALL_GATHER"]
    assert theirs["BUFFER"] == 0 and "frozen_weights" not in mine  # full fine-tuning: every parameter trains

    # the whole, but for the workspaces MemTracker cannot see: within what lives in one block's backward only
    total = sum(mine.values()) - mine["workspaces"]
    same_block = mine.get("recomputed_activations", 0) + mine.get("backward_transients", 0)
    assert abs(total - theirs["Total"]) <= same_block
    # the reported parts: the same tensors as blocks of one GPU's allocator, slack on top
    reported = result.breakdown["before_validation"]
    for kind, size in mine.items():
        assert size <= reported[kind], kind
    assert sum(reported.values()) == round(result.memory.before_validation * 1024**3)  # within rounding


def test_a_lora_runs_share_is_fsdp2s(fake_process_group):
    """LoRA (rank 8 on the tiny-rotary preset, with checkpointing): the frozen base is sharded and gathered
    too, and only the adapters' gradients are reduced. (tiny-rotary: no sincos position buffer, which
    diffusers' default build sizes otherwise than the trainer's model; buffers are not sharded.)"""
    config = run("tiny-rotary", mixed_precision="bf16", **{"lora.rank": 8})
    theirs = fsdp_memtracker_peak(fake_process_group, config, ALL_PRESETS["tiny-rotary"], (9, 64, 64))
    result, mine = sharded_estimate(config, (9, 64, 64))
    tensors = _parameter_count(ALL_PRESETS["tiny-rotary"]) + 2 * 8 * 4  # the adapters' A and B of 4 targets a block
    weights = mine["frozen_weights"] + mine["trainable_weights"]
    assert weights == pytest.approx(theirs["SHARDED_PARAM"] + theirs["BUFFER"], abs=tensors)
    assert mine["optimizer_state"] == pytest.approx(theirs["OPT"], abs=(2 + STEP_BYTES) * tensors)
    assert mine.get("gradients", 0) == pytest.approx(theirs["SHARDED_GRAD"], abs=tensors)
    assert mine["gathered_weights"] == theirs["UNSHARDED_PARAM"] + theirs["ALL_GATHER"]
    total = sum(mine.values()) - mine["workspaces"]
    same_block = mine.get("recomputed_activations", 0) + mine.get("backward_transients", 0)
    assert abs(total - theirs["Total"]) <= same_block


def _parameter_count(spec) -> int:
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        return len(list(CogVideoXTransformer3DModel(**spec.transformer_config).parameters()))
