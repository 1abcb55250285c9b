"""How long `cogtune --help` and `cogtune --version` take in a fresh process (target: well under 1 s).

    python benchmarks/cli_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def measure(args: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cogtune", *args], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    options = parser.parse_args()
    for args in (["--help"], ["--version"], ["train", "t2v", "--help"]):
        times = measure(args, options.repeat)
        print(f"cogtune {' '.join(args):<20} median {statistics.median(times) * 1000:6.0f} ms   "
              f"max {max(times) * 1000:6.0f} ms   ({options.repeat} runs)")


if __name__ == "__main__":
    main()
