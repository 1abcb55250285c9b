"""Validate a dataset of 1,000 short clips; the target is under a minute on 2 CPU cores.

    python benchmarks/validate_1000.py [--clips 1000] [--workdir /tmp/cogtune-bench-validate]

Builds (once, cached in --workdir) 1,000 clips as copies of 8 distinct synthetic clips of realistic
shapes (49 frames of 480x720 at 8 fps, and 3 s of 1280x720 at 30 fps), every one a separate file,
then times `cogtune dataset validate DIR --json` in a fresh process (imports included) and prints
the figure as a line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(root: Path, clips: int) -> None:
    from cogtune.data.synthetic import caption_for, render_clip
    from cogtune.data.video import write_video

    marker = root / f".built-{clips}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "videos").mkdir(parents=True)
    shapes = [("circle", "red", "left"), ("square", "blue", "up"), ("circle", "green", "down"),
              ("square", "yellow", "right")]
    sources = []
    for index, (shape, color, direction) in enumerate(shapes):
        small = root / f"src_{index}_480p.mp4"
        write_video(small, render_clip(shape, color, direction, 49, 480, 720), fps=8)
        large = root / f"src_{index}_720p.mp4"
        write_video(large, render_clip(shape, color, direction, 90, 720, 1280), fps=30)
        sources += [(small, caption_for(shape, color, direction)), (large, caption_for(shape, color, direction))]
    captions, videos = [], []
    for index in range(clips):
        source, caption = sources[index % len(sources)]
        relative = f"videos/clip_{index:05d}.mp4"
        shutil.copyfile(source, root / relative)
        captions.append(caption)
        videos.append(relative)
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    marker.touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cogtune-bench-validate"))
    options = parser.parse_args()
    build(options.workdir, options.clips)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cogtune", "dataset", "validate", str(options.workdir), "--json"],
                            capture_output=True, text=True, env={**os.environ, "COGTUNE_QUIET": "1"})
    elapsed = time.perf_counter() - start
    document = json.loads(result.stdout)
    print(json.dumps({
        "benchmark": "dataset validate",
        "clips": document["items"],
        "ok": document["ok"],
        "seconds": round(elapsed, 2),
        "clips_per_second": round(document["items"] / elapsed, 1),
        "cpu_count": os.cpu_count(),
        "total_video_seconds": document["stats"]["total_duration_s"],
    }))


if __name__ == "__main__":
    main()
