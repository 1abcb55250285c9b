"""How long `cogtune bench memory --estimate` takes for the real presets at their default shapes.

    python benchmarks/estimate_speed.py                          # cogvideox-2b and cogvideox-5b
    python benchmarks/estimate_speed.py --models cogvideox-2b --repeat 3

Each run is a fresh process (`python -m cogtune bench memory --estimate --model M --json FILE`), as a
user runs it: the wall time includes start-up and building the architecture on the meta device; the
estimator's own time is the `estimator_seconds` it writes. Prints one line of JSON.

    python benchmarks/estimate_speed.py --in-process             # also: one configuration's own time
    python benchmarks/estimate_speed.py --in-process --exact     # the same, with the full trace

`--in-process` also times `estimate_run` for each model's default run (LoRA r64, gradient
checkpointing, AdamW, validation on, at the model's default shape) in this process, after the libraries
are imported (their import, a few seconds, is reported apart as `import_seconds`) and with the
estimator's memoized meta kernels cleared first, so that each figure is what one configuration costs
on its own (`fit`'s pre-flight check, a row of a grid). `--exact` times the full trace instead
(`estimate_run(..., exact=True)`: no memoization, FLOPs counted in a step of their own), the figures
the fast path must equal.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_estimate(model: str, workdir: Path) -> tuple[float, float]:
    """(wall seconds of the whole command, the estimator's own seconds) for one run."""
    output = workdir / f"{model}.json"
    command = [sys.executable, "-m", "cogtune", "bench", "memory", "--estimate", "--model", model,
               "--json", str(output)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = json.loads(output.read_text())["rows"]
    return wall, sum(row["estimator_seconds"] for row in rows)


def time_in_process(model: str, exact: bool) -> tuple[float, float]:
    """(seconds of one `estimate_run` of `model`'s default run, its peak reserved GiB)."""
    from cogtune.config import replace_settings
    from cogtune.models.registry import ALL_PRESETS
    from cogtune.train.config import TrainConfig
    from cogtune.train.sizing.estimate import estimate_run
    from cogtune.train.sizing.trace import clear_meta_cache

    spec = ALL_PRESETS[model]
    config = TrainConfig(task="i2v" if spec.is_i2v else "t2v", model=model, data="<bench>", output_dir="<bench>",
                         random_weights=True)
    config = replace_settings(config, {"lora.rank": 64, "gradient_checkpointing": True})
    shape = (spec.default_frames, spec.default_height, spec.default_width)
    clear_meta_cache()
    start = time.perf_counter()
    result = estimate_run(config, [shape], shape, exact=exact)
    return time.perf_counter() - start, result.memory.after_testing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cogvideox-2b,cogvideox-5b", help="Presets, comma-separated.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per preset (the median is reported).")
    parser.add_argument("--in-process", action="store_true",
                        help="Also time one estimate per preset in this process (libraries imported first).")
    parser.add_argument("--exact", action="store_true", help="With --in-process: time the full trace.")
    options = parser.parse_args()

    import torch

    from cogtune import __version__

    results = {}
    with tempfile.TemporaryDirectory(prefix="cogtune-bench-estimate-") as workdir:
        for model in options.models.split(","):
            runs = [time_estimate(model, Path(workdir)) for _ in range(options.repeat)]
            results[model] = {
                "wall_seconds": round(statistics.median(wall for wall, _ in runs), 2),
                "estimator_seconds": round(statistics.median(own for _, own in runs), 2),
                "runs": options.repeat,
            }
    if options.in_process:
        start = time.perf_counter()
        from cogtune.quiet import quiet_libraries

        quiet_libraries()
        import diffusers  # noqa: F401  # what the estimator imports on its first call
        import peft  # noqa: F401

        from cogtune.train.sizing.estimate import estimate_run  # noqa: F401
        import_seconds = time.perf_counter() - start
        for model in options.models.split(","):
            runs = [time_in_process(model, options.exact) for _ in range(options.repeat)]
            results[model].update({
                "in_process_seconds": round(statistics.median(seconds for seconds, _ in runs), 2),
                "in_process_exact": options.exact, "after_testing_gib": round(runs[0][1], 3),
            })
        results["import_seconds"] = round(import_seconds, 2)
    print(json.dumps({
        "benchmark": "estimate_speed", "command": "cogtune bench memory --estimate --model MODEL",
        "results": results, "cogtune": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
