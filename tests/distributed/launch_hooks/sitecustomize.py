"""On PYTHONPATH of the suite's launched processes (tests/distributed/conftest.py's `accelerate_launch`).

COGTUNE_TEST_GLOO_ONLY=1: DeepSpeed's CPU collectives go over plain gloo instead of its shared-memory
op. DeepSpeed compiles that op (`deepspeed_shm_comm`, C++ with OpenMP) in every fresh environment at
its first start, 40 s on 2 idle cores, 3 min on a busy machine, and the suite tests cogtune's use of
DeepSpeed, not DeepSpeed's CPU kernels. DeepSpeed has no setting for it; it falls back to gloo where
its builder says the op cannot be built (as on every platform but Linux), which is what this says.

COGTUNE_TEST_RECORD_LATENTS=DIR: every video `cogtune.generate.generate_videos` renders in this process
also leaves the denoised latents the VAE decodes in DIR, so that a test compares tensors, not 8-bit
video, as the in-process `sampled` fixture does (tests/conftest.py).
"""

import os

if os.environ.get("COGTUNE_TEST_GLOO_ONLY"):
    try:
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    except ImportError:  # deepspeed not installed: the tests that need it are skipped
        pass
    else:
        ShareMemCommBuilder.is_compatible = lambda self, verbose=False: False

if os.environ.get("COGTUNE_TEST_RECORD_LATENTS"):
    import itertools
    from pathlib import Path

    import cogtune.generate as _generate

    _folder = Path(os.environ["COGTUNE_TEST_RECORD_LATENTS"])
    _count = itertools.count()
    _render = _generate.generate_videos

    def _recording(pipe, spec, **arguments):
        """`generate_videos`, saving each video's latents as seed<S>-<lora|base>-rank<R>-<pid>-<n>.safetensors."""
        from safetensors.torch import save_file

        from cogtune.lora.switch import lora_layers

        layers = lora_layers(pipe.transformer)
        kind = "base" if not layers or all(layer.disable_adapters for layer in layers) else "lora"
        latents = []
        pipe.decode_latents = lambda tensor, decode=pipe.decode_latents: latents.append(tensor.float().clone()) \
            or decode(tensor)
        try:
            videos = _render(pipe, spec, **arguments)
        finally:
            del pipe.decode_latents  # the pipeline's own method again
        _folder.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        for offset, tensor in enumerate(latents):
            name = f"seed{arguments['seed'] + offset}-{kind}-rank{rank}-{os.getpid()}-{next(_count)}.safetensors"
            save_file({"latents": tensor.contiguous()}, str(_folder / name))
        return videos

    _generate.generate_videos = _recording
