"""How long `cogtune bench memory --estimate` takes per configuration, in a fresh process as a user runs it.

    python benchmarks/estimate_speed.py        # cogvideox-5b at 49x480x720, cogvideox1.5-5b at 81x768x1360
    python benchmarks/estimate_speed.py --cases cogvideox-2b@49x480x720 --repeat 3
    python benchmarks/estimate_speed.py --baseline /tmp/base-e8f884c   # side by side with an older checkout

Each run is a fresh process (`python -m cogtune bench memory --estimate --model M --shape FxHxW --json FILE`,
`--no-cache` so that the estimate is computed, not read back), as a user runs it: the wall time includes
start-up, the libraries' import and building the architecture on the meta device; the estimator's own
time is the `estimator_seconds` it writes. With `--baseline DIR` (a checkout of another commit, e.g. made
with `git worktree add DIR COMMIT`), each case is also run from that checkout (`PYTHONPATH=DIR`, without
`--no-cache`, which older versions lack and which have no cache), alternating with this one run by run,
so that both see the same load. `cached_wall_seconds` is this checkout's run of the same command once its
estimate is cached (what a repeated grid row or train's pre-flight check costs). Prints one line of JSON.

    python benchmarks/estimate_speed.py --in-process             # also: one configuration's own time
    python benchmarks/estimate_speed.py --in-process --exact     # the same, with the full trace

`--in-process` also times `estimate_run` for each case's default run (LoRA r64, gradient checkpointing,
AdamW, validation on) in this process, after the libraries are imported (their import, a few seconds, is
reported apart as `import_seconds`) and with the estimator's memoized meta kernels cleared first, so that
each figure is what one configuration costs on its own. `--exact` times the full trace instead
(`estimate_run(..., exact=True)`: no memoization, no replayed calls, FLOPs counted in a step of their
own), the figures the fast path must equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_estimate(model: str, shape: str, workdir: Path, checkout: Path | None = None,
                  cache: bool = False) -> tuple[float, float]:
    """(wall seconds of the whole command, the estimator's own seconds) for one run, from this checkout or
    from `checkout` (an older one: no `--no-cache`)."""
    output = workdir / f"{model}-{shape}-{'base' if checkout else 'this'}.json"
    command = [sys.executable, "-m", "cogtune", "bench", "memory", "--estimate", "--model", model, "--shape", shape,
               "--json", str(output)]
    if checkout is None and not cache:
        command.append("--no-cache")
    here = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(checkout or here), "COGTUNE_HOME": str(workdir / "home")}
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=environment, cwd=checkout or here)
    wall = time.perf_counter() - start
    rows = json.loads(output.read_text())["rows"]
    return wall, sum(row["estimator_seconds"] for row in rows)


def time_case(model: str, shape: str, workdir: Path, repeat: int, baseline: Path | None) -> dict:
    """This checkout's times (and the baseline's, alternating run by run), and a cached run's."""
    this, base = [], []
    for _ in range(repeat):
        if baseline is not None:
            base.append(time_estimate(model, shape, workdir, baseline))
        this.append(time_estimate(model, shape, workdir))
    entry = {**_median(this), "runs": repeat}
    time_estimate(model, shape, workdir, cache=True)  # fills the cache
    entry["cached_wall_seconds"] = round(time_estimate(model, shape, workdir, cache=True)[0], 2)
    if base:
        entry["baseline"] = _median(base)
        entry["wall_ratio"] = round(entry["wall_seconds"] / entry["baseline"]["wall_seconds"], 3)
    return entry


def _median(runs: list[tuple[float, float]]) -> dict[str, float]:
    return {"wall_seconds": round(statistics.median(wall for wall, _ in runs), 2),
            "estimator_seconds": round(statistics.median(own for _, own in runs), 2)}


def time_in_process(model: str, shape_text: str, exact: bool) -> tuple[float, float]:
    """(seconds of one `estimate_run` of `model`'s default run at the shape, its peak reserved GiB)."""
    from cogtune.config import replace_settings
    from cogtune.models.registry import ALL_PRESETS
    from cogtune.train.config import TrainConfig
    from cogtune.train.sizing.estimate import estimate_run
    from cogtune.train.sizing.trace import clear_meta_cache

    spec = ALL_PRESETS[model]
    config = TrainConfig(task="i2v" if spec.is_i2v else "t2v", model=model, data="<bench>", output_dir="<bench>",
                         random_weights=True)
    config = replace_settings(config, {"lora.rank": 64, "gradient_checkpointing": True})
    shape = tuple(int(v) for v in shape_text.split("x"))
    clear_meta_cache()
    start = time.perf_counter()
    result = estimate_run(config, [shape], shape, exact=exact)
    return time.perf_counter() - start, result.memory.after_testing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cogvideox-5b@49x480x720,cogvideox1.5-5b@81x768x1360",
                        help="MODEL@FxHxW, comma-separated.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per case (the median is reported).")
    parser.add_argument("--baseline", type=Path, help="A checkout of another commit, timed alongside.")
    parser.add_argument("--in-process", action="store_true",
                        help="Also time one estimate per case in this process (libraries imported first).")
    parser.add_argument("--exact", action="store_true", help="With --in-process: time the full trace.")
    options = parser.parse_args()

    import torch

    from cogtune import __version__

    cases = [case.split("@") for case in options.cases.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cogtune-bench-estimate-") as folder:
        for model, shape in cases:
            results[f"{model}@{shape}"] = time_case(model, shape, Path(folder), options.repeat, options.baseline)
    if options.in_process:
        start = time.perf_counter()
        from cogtune.quiet import quiet_libraries

        quiet_libraries()
        import diffusers  # noqa: F401  # what the estimator imports on its first call
        import peft  # noqa: F401

        from cogtune.train.sizing.estimate import estimate_run  # noqa: F401
        import_seconds = time.perf_counter() - start
        for model, shape in cases:
            runs = [time_in_process(model, shape, options.exact) for _ in range(options.repeat)]
            results[f"{model}@{shape}"].update({
                "in_process_seconds": round(statistics.median(seconds for seconds, _ in runs), 2),
                "in_process_exact": options.exact, "after_testing_gib": round(runs[0][1], 3),
            })
        results["import_seconds"] = round(import_seconds, 2)
    print(json.dumps({
        "benchmark": "estimate_speed",
        "command": "cogtune bench memory --estimate --model MODEL --shape FxHxW --no-cache",
        "baseline": str(options.baseline) if options.baseline else None,
        "results": results, "cogtune": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
