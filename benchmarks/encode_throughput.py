"""Clips per second of `cogtune encode` (VAE latents), on the CPU with `tiny` or on a GPU.

    python benchmarks/encode_throughput.py                                   # tiny, CPU, 9x64x64
    python benchmarks/encode_throughput.py --model cogvideox-5b --random-weights \\
        --bucket 49x480x720 --clips 16 --batch-size 1 --num-workers 4        # real VAE shape, on a GPU

Builds synthetic clips of the bucket's shape (cached in --workdir), then times the two phases of
an encode into a fresh cache and prints one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--bucket", default="9x64x64")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cogtune-bench-encode"))
    options = parser.parse_args()

    os.environ.setdefault("COGTUNE_QUIET", "1")
    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    import torch

    from cogtune.data.clips import Bucket
    from cogtune.data.dataset import DatasetConfig
    from cogtune.data.synthetic import make_synthetic_dataset
    from cogtune.encode import EncodeConfig
    from cogtune.encode import run as encode_run

    bucket = Bucket.parse(options.bucket)
    data = options.workdir / f"data-{bucket}-{options.clips}"
    if not (data / "videos.txt").is_file():
        make_synthetic_dataset(data, count=options.clips, frames=bucket.frames, height=bucket.height,
                               width=bucket.width)
    cache = options.workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    config = EncodeConfig(model=options.model, output_dir=str(cache), data=DatasetConfig(root=str(data)),
                          buckets=(str(bucket),), batch_size=options.batch_size, num_workers=options.num_workers,
                          random_weights=options.random_weights, vae_tiling=options.vae_tiling)
    plan = encode_run.plan_encode(config)
    cache.mkdir(parents=True)
    from cogtune.distributed import process_state

    device = process_state().device
    started = time.perf_counter()
    encode_run._encode_text(plan, config, cache, device, plan.pending_text, shared=True)
    text_seconds = time.perf_counter() - started
    started = time.perf_counter()
    encode_run._encode_latents(plan, config, cache, device, plan.pending_latents)
    if device.type == "cuda":
        torch.cuda.synchronize()
    latent_seconds = time.perf_counter() - started
    print(json.dumps({
        "benchmark": "encode",
        "model": options.model,
        "bucket": str(bucket),
        "clips": options.clips,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "batch_size": options.batch_size,
        "num_workers": options.num_workers,
        "captions_seconds": round(text_seconds, 2),
        "clips_seconds": round(latent_seconds, 2),
        "clips_per_second": round(options.clips / latent_seconds, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 2) if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
