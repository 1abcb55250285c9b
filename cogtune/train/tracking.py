"""What `--report-to tensorboard|wandb` records, through accelerate's trackers.

Every optimizer step, through `accelerator.log` (the same call for either tracker): `loss`, `lr`,
`grad_norm` (the global norm gradient clipping computed, before clipping; absent when clipping is
off, and under DeepSpeed, which clips inside its engine), `step_seconds` (the step's wall time,
as in training_summary.json) and, on a GPU, `memory/max_allocated_gib` and
`memory/max_reserved_gib` (the peaks so far, as in memory.json; a CPU run logs no memory rather
than a made-up 0).

Every evaluation (`cogtune.train.evaluation`): `eval/heldout_loss`, `eval/base_heldout_loss` (the LoRA
switched off), `eval/lora_effect` and `eval/seconds`, each when the run has it.

Every validation pass, its videos, tagged `validation/NN` at the step they were rendered after:
wandb takes the MP4 files as they are (`wandb.Video`); TensorBoard shows videos as animated GIF
image summaries, which torch's `SummaryWriter.add_video` makes only with moviepy 1.x (it imports
`moviepy.editor`, gone since moviepy 2.0), so cogtune encodes the GIF itself (imageio) and writes
the same summary through the writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v3 as iio
import torch

from cogtune.train.config import TrainConfig
from cogtune.train.run_folder import RunFolder

PROJECT = "cogtune"  # the trackers' project name (TensorBoard: a folder in the run's logs, `RunFolder.logs`)
GIB = 1024**3


def tracker_init_kwargs(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """accelerate's `init_kwargs`: wandb writes its files into the run's folder too, named after it."""
    run = RunFolder.of(config)
    return {"wandb": {"dir": str(run.logs), "name": run.root.resolve().name}}


def step_values(loss: float, lr: float, grad_norm: Any, seconds: float, device: Any) -> dict[str, float]:
    """The scalars logged for one optimizer step."""
    values = {"loss": loss, "lr": lr, "step_seconds": seconds}
    if grad_norm is not None:
        values["grad_norm"] = float(grad_norm)
    return {**values, **gpu_memory_values(device)}


def evaluation_values(record: Any) -> dict[str, float]:
    """The scalars logged for one evaluation (`cogtune.train.evaluation.Evaluation`); absent ones left out."""
    values = {"eval/heldout_loss": record.loss, "eval/base_heldout_loss": record.base_loss,
              "eval/lora_effect": record.effect, "eval/seconds": record.seconds}
    return {name: float(value) for name, value in values.items() if value is not None}


def gpu_memory_values(device: Any) -> dict[str, float]:
    """Peak allocated and reserved memory of a CUDA device so far, in GiB; nothing for a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def log_validation_videos(accelerator: Any, folder: Path, step: int, prompts: list[str], fps: int) -> None:
    """Log the videos a validation pass wrote into `folder` (`NN.mp4`, NN the prompt's index)."""
    videos = sorted(folder.glob("*.mp4"))
    if not videos or not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            _log_tensorboard_gifs(tracker.writer, videos, step, fps)
        elif tracker.name == "wandb":
            import wandb

            captions = {f"{index:02d}": prompt for index, prompt in enumerate(prompts)}
            tracker.log({f"validation/{video.stem}": wandb.Video(str(video), caption=captions.get(video.stem),
                                                                  format="mp4")
                         for video in videos}, step=step)


def _log_tensorboard_gifs(writer: Any, videos: list[Path], step: int, fps: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    from cogtune.data.video import read_all_frames

    for video in videos:
        frames = read_all_frames(video)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=frames.shape[3],
                              encoded_image_string=video_gif(frames, fps))
        writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"validation/{video.stem}", image=image)]),
                                       global_step=step)
    writer.flush()


def video_gif(video: Path | Any, fps: int) -> bytes:
    """An endlessly looping GIF of a video file or of uint8 frames (frames, height, width, 3)."""
    from cogtune.data.video import read_all_frames

    frames = read_all_frames(video) if isinstance(video, (str, Path)) else video
    return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)


def logs_message(accelerator: Any, config: TrainConfig) -> str | None:
    """Where the tracker's logs are, and how to look at them (for the end of the run)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            logs = RunFolder.of(config).logs
            return f"tensorboard logs: {logs / PROJECT} (view with: tensorboard --logdir {logs})"
        if tracker.name == "wandb":
            run = tracker.run
            if getattr(run, "url", None):
                return f"wandb run: {run.url}"
            folder = Path(run.dir).parent  # an offline run (WANDB_MODE=offline): its files are here
            return f"wandb offline run: {folder} (upload with: wandb sync {folder})"
    return None
