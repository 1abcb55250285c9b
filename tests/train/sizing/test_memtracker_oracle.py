"""The breakdown against torch's own memory tracker, `torch.distributed._tools.mem_tracker.MemTracker`.

MemTracker watches the same training steps as the estimator's tracker: `estimate_run(observe=...)` enters
it above the tracker, so both see every op of the trace (two steps, forward, backward, the optimizer). It
sorts what is alive into parameters and buffers, gradients, activations (what the forward makes, and a
checkpointed block's recompute), temporaries (backward's own tensors) and optimizer state, and keeps them
at the instant its total peaks. cogtune's parts at its own peak instant, in the tensors' own bytes
(`peak_requested`, before the CUDA allocator's rounding, as MemTracker counts on a non-CUDA device), must be
MemTracker's to the byte, except for what is named here:

- workspaces: cuBLAS's (32 MiB, taken at the first matmul) and the flash kernel's float32 `dq` accumulator
  in its backward are not tensors, so MemTracker sees neither; cogtune counts them as `workspaces`;
- the loss's seed gradient: `loss.backward()` makes it (a float32 scalar, 4 bytes) before the autograd
  engine starts, so MemTracker calls it an activation and cogtune a backward temporary (where it is still
  alive at the peak);
- autocast's weight copies (made by the GPU emulation, `trace.gpu_semantics`, in the forward) are among
  MemTracker's activations; cogtune names them apart;
- the 8-bit optimizer (bitsandbytes' AdamW8bit, the one cogtune supports that runs on a CPU; its step
  cannot run on meta tensors, nor FakeTensorMode's) is not traced: its state is sized by arithmetic, and
  checked here against the state bitsandbytes really keeps on the CPU, as MemTracker counts it.

The reported parts (`breakdown`) are the same tensors as blocks of the allocator: never less than the
tensors' bytes, each part no more than the rounding of its blocks above them.
MemTracker runs on the meta device (the estimator's): FakeTensorMode cannot make the CUDA tensors of a GPU
run in a CPU-only build of torch, and MemTracker's categories do not depend on the device.
Checkpointing's early stop is turned off for both: with it a block's recompute never returns, and
MemTracker then calls every later backward tensor an activation (its documented limitation).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.checkpoint import set_checkpoint_early_stop

import cogtune.train.sizing.estimate as estimate_module
from cogtune.models.registry import ALL_PRESETS
from cogtune.train.sizing.estimate import estimate_run
from cogtune.train.sizing.trace import CUBLAS_WORKSPACE_BYTES
from tests.train.sizing.test_estimate import run

# the 5b's transformer (its widths, heads, rotary positions, text and time embeddings) cut to 2 blocks
CUT_5B = dataclasses.replace(ALL_PRESETS["cogvideox-5b"], transformer_config=MappingProxyType(
    {**ALL_PRESETS["cogvideox-5b"].transformer_config, "num_layers": 2}))
SEED_GRADIENT = 4  # the float32 scalar `loss.backward()` starts from


class StepwiseMemTracker(MemTracker):
    """MemTracker over several training steps of a LoRA model, with its own bookkeeping otherwise.

    Two adaptations, both through MemTracker's own methods: its per-module statistics restart at each step
    (`reset_mod_stats`, as its error message for a second iteration says), and its gradient hooks go on the
    parameters that train only (it registers one on every parameter, which torch refuses on frozen ones).
    """

    def __init__(self, root: torch.nn.Module) -> None:
        super().__init__()
        self.root = root
        self.hooked: set[int] = set()

    def _pre_fw_hook(self, module, inputs):
        if module is self.root and module in self.memory_tracking and not self._mod_tracker.is_bw:
            self.reset_mod_stats()  # the next step
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for parameter in module.parameters() if install_grad_hooks else ():
            if parameter.requires_grad and id(parameter) not in self.hooked:
                self.hooked.add(id(parameter))
                parameter.register_hook(self._gradient)
                parameter.register_post_accumulate_grad_hook(lambda p: self._gradient(p.grad))
        return memory

    def _gradient(self, gradient: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(gradient, _MemRefType.GRAD)


def traced_with_memtracker(config, shape):
    """The estimate of `config` at `shape` (no validation), the tracker's parts at its peak in the tensors'
    own bytes, and MemTracker's peak snapshot of the same steps (meta device), by category name."""
    seen = {}

    def observe(transformer, tracker):
        seen["tracker"] = tracker
        seen["memtracker"] = memtracker = StepwiseMemTracker(transformer)
        memtracker.track_external(transformer)
        return memtracker

    with set_checkpoint_early_stop(False):
        result = estimate_run(config, [shape], None, observe=observe)
    peak = seen["memtracker"].get_tracker_snapshot("peak")[torch.device("meta")]
    return result, seen["tracker"].peak_requested(), {key.value if hasattr(key, "value") else key: value
                                                      for key, value in peak.items()}


CASES = [  # LoRA and full, with and without checkpointing, AdamW and the 8-bit AdamW, tiny and a cut-down 5b
    ("tiny", {}),
    ("tiny", {"full": True}),
    ("tiny", {"optimizer.name": "adamw-8bit", "gradient_checkpointing": False}),
    ("tiny-1.5-i2v", {"lora.rank": 8, "gradient_checkpointing": False}),
    ("5b-cut", {}),
    ("5b-cut", {"full": True, "gradient_checkpointing": False}),  # its peak: AdamW's step and its temporaries
]


@pytest.fixture
def cut_5b(monkeypatch):
    real = estimate_module.model_spec
    monkeypatch.setattr(estimate_module, "model_spec", lambda reference: CUT_5B if reference == "5b-cut"
                        else real(reference))


def _config(model, settings):
    if model != "5b-cut":
        return run(model, **settings)
    return dataclasses.replace(run("cogvideox-5b", **settings), model="5b-cut")


@pytest.mark.parametrize(("model", "settings"), CASES)
def test_each_part_of_the_peak_is_memtrackers(cut_5b, model, settings):
    config = _config(model, settings)
    shape = (9, 128, 128) if model == "5b-cut" else (9, 64, 64)
    result, mine, theirs = traced_with_memtracker(config, shape)
    traced_state = config.optimizer.name == "adamw"
    # weights, gradients, optimizer state: the same tensors, to the byte
    assert mine.get("frozen_weights", 0) + mine.get("trainable_weights", 0) == theirs["Parameter"] + theirs["Buffer"]
    assert mine.get("gradients", 0) == theirs["Gradient"]
    assert mine.get("optimizer_state", 0) == (theirs["Optstate"] if traced_state else 0)
    # activations and backward's temporaries, but for the seed gradient
    activations = (mine.get("saved_activations", 0) + mine.get("recomputed_activations", 0)
                   + mine.get("autocast_weight_copies", 0))
    seed = theirs["Activation"] - activations  # the seed gradient, where it is still alive at the peak
    assert seed in (0, SEED_GRADIENT)
    assert mine.get("backward_transients", 0) - seed == theirs["Temp"]
    assert theirs["Other"] == 0 and "other" not in mine
    # the workspaces MemTracker cannot see: cuBLAS's, and a flash backward's dq accumulator if one is running
    assert mine["workspaces"] >= CUBLAS_WORKSPACE_BYTES
    assert sum(mine.values()) - mine["workspaces"] == theirs["Total"]
    if config.gradient_checkpointing:  # the peak is in backward, recomputing a block
        assert mine["recomputed_activations"] > 0

    # the reported parts: the same tensors as the allocator's blocks (rounded up to 512 bytes; a large block
    # keeps a remainder of up to 1 MiB unsplit), the 8-bit state added by arithmetic, slack on top
    reported = result.breakdown["before_validation"]
    for kind, size in mine.items():
        assert size <= reported[kind], kind
    blocks = sum(reported.values()) - reported["allocator_slack"] - reported.get("reserved_after_peak", 0)
    assert blocks == round(result.memory.allocated_peak_training * 1024**3)
    assert reported["allocator_slack"] >= 0


def _bnb_state_on_cpu(shapes):
    """The state bitsandbytes' AdamW8bit keeps after a step over real CPU tensors of these shapes, counted by
    MemTracker (its optimizer-state category)."""
    import bitsandbytes as bnb

    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    optimizer = bnb.optim.AdamW8bit(parameters, lr=1e-4)
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    memtracker = MemTracker()
    memtracker.track_external(*parameters, *(p.grad for p in parameters))  # updated in place: not state
    with memtracker:
        optimizer.step()
    return memtracker.get_tracker_snapshot("current")[torch.device("cpu")][_MemRefType.OPT], len(optimizer.state)


def test_the_8bit_state_is_what_bitsandbytes_keeps():
    """The LoRA of the 5b (rank 64: 64 x 3072 matrices, 8-bit state) and of the tiny preset (small matrices,
    which bitsandbytes keeps in float32): cogtune's arithmetic is bitsandbytes' state, each tensor rounded
    up to the CUDA allocator's 512 bytes."""
    for shapes in ([(64, 3072), (3072, 64)] * 3, [(8, 64), (64, 8), (4096,)]):
        measured, count = _bnb_state_on_cpu(shapes)
        trainable = [torch.empty(shape, device="meta") for shape in shapes]
        sized = estimate_module._optimizer_state_bytes("adamw-8bit", trainable)
        tensors = sum(2 if torch.Size(s).numel() < 4096 else 4 for s in shapes) + 2  # states, absmax, 2 qmaps
        assert measured <= sized < measured + 512 * tensors
        assert count == len(shapes)
