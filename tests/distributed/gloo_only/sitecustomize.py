"""On PYTHONPATH of the suite's DeepSpeed launches only (tests/distributed/conftest.py): DeepSpeed's CPU
collectives go over plain gloo instead of its shared-memory op.

DeepSpeed compiles that op (`deepspeed_shm_comm`, C++ with OpenMP) in every fresh environment at its
first start, 40 s on 2 idle cores, 3 min on a busy machine, and the suite tests cogtune's use of
DeepSpeed, not DeepSpeed's CPU kernels. DeepSpeed has no setting for it; it falls back to gloo where its
builder says the op cannot be built (as on every platform but Linux), which is what this says.
"""

try:
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
except ImportError:  # deepspeed not installed: the tests that need it are skipped
    pass
else:
    ShareMemCommBuilder.is_compatible = lambda self, verbose=False: False
