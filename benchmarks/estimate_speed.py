"""How long `cogtune bench memory --estimate` takes for the real presets at their default shapes.

    python benchmarks/estimate_speed.py                          # cogvideox-2b and cogvideox-5b
    python benchmarks/estimate_speed.py --models cogvideox-2b --repeat 3

Each run is a fresh process (`python -m cogtune bench memory --estimate --model M --json FILE`), as a
user runs it: the wall time includes start-up and building the architecture on the meta device; the
estimator's own time is the `estimator_seconds` it writes. Prints one line of JSON.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cogvideox-2b,cogvideox-5b", help="Presets, comma-separated.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per preset (the median is reported).")
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
    print(json.dumps({
        "benchmark": "estimate_speed", "command": "cogtune bench memory --estimate --model MODEL",
        "results": results, "cogtune": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
