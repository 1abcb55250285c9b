"""`cogtune demo`: the walking skeleton, offline, with the same engine calls as the real thing.

On the tiny model and synthetic clips it makes, it runs dataset validation, encoding, LoRA
training and sampling, and leaves every artifact in one folder:

    DIR/model       the tiny diffusers pipeline (usable as MODEL)
    DIR/data        prompts.txt, videos.txt, videos/
    DIR/cache       the latent cache
    DIR/run         the training run (pytorch_lora_weights.safetensors, memory.json, loss.png, ...)
    DIR/sample.mp4  a video sampled with the trained LoRA
"""

from __future__ import annotations

from pathlib import Path

from cogtune import report

DEMO_PROMPT = "A red circle moves left across a dark background."
DEMO_BUCKET = (9, 64, 64)


def run_demo(output_dir: str | Path, steps: int = 100, clips: int = 6) -> dict[str, Path]:
    from cogtune.data.dataset import DatasetConfig
    from cogtune.data.synthetic import make_synthetic_dataset
    from cogtune.data.validate import print_report, validate_dataset
    from cogtune.encode import EncodeConfig, encode_dataset
    from cogtune.errors import ConfigError, DataError
    from cogtune.models.loading import load_tokenizer, resolve_model
    from cogtune.models.tiny import ensure_tiny_model
    from cogtune.sample import SampleConfig, run_sample
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import CheckpointConfig, EvaluationConfig, LoraConfig, OptimizerConfig, ValidationConfig

    root = Path(output_dir)
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty (a previous demo?); the demo writes into a new folder",
                          hint=f"delete {root}, or pass another --output-dir")
    paths = {
        "model": root / "model",
        "data": root / "data",
        "cache": root / "cache",
        "run": root / "run",
        "sample": root / "sample.mp4",
    }
    frames, height, width = DEMO_BUCKET

    report.step("1/6  tiny model")
    ensure_tiny_model("tiny", paths["model"])
    model = resolve_model(str(paths["model"]))
    report.success(f"tiny CogVideoX pipeline ({model.spec.family}) in {paths['model']}")

    report.step("2/6  synthetic clips")
    make_synthetic_dataset(paths["data"], count=clips, frames=17, height=height, width=width, fps=model.spec.fps)
    report.success(f"{clips} clips with captions in {paths['data']}")

    report.step("3/6  dataset validate")
    dataset = DatasetConfig(root=str(paths["data"]))
    validation = validate_dataset(dataset, frames=frames, height=height, width=width, model=model.spec,
                                  tokenizer=load_tokenizer(model))
    print_report(validation)
    if not validation.ok:
        raise DataError(f"the demo dataset has errors: {validation.errors[0].located()}")

    report.step("4/6  encode")
    encode_dataset(EncodeConfig(
        model=str(paths["model"]), output_dir=str(paths["cache"]), data=dataset,
        buckets=("x".join(str(v) for v in DEMO_BUCKET),), validation_prompts=(DEMO_PROMPT,), num_workers=0,
    ))

    report.step("5/6  train t2v (LoRA)")
    result = run_training(TrainConfig(
        task="t2v", model=str(paths["model"]), data=str(paths["cache"]), output_dir=str(paths["run"]), steps=steps,
        lora=LoraConfig(rank=16), optimizer=OptimizerConfig(lr=1e-3),
        validation=ValidationConfig(prompts=(DEMO_PROMPT,), steps=10),
        checkpointing=CheckpointConfig(every=max(1, steps // 2), keep=1),
        # a quarter of the clips held out: the held-out loss in loss.png (needs one clip left to train on)
        evaluation=EvaluationConfig(split=0.25) if clips > 1 else EvaluationConfig(),
    ))
    window = max(1, min(10, steps // 4))
    first, last = result.losses[:window], result.losses[-window:]
    report.success(f"mean loss of the first {window} steps {sum(first) / window:.3f}, "
                   f"of the last {window} {sum(last) / window:.3f}")

    report.step("6/6  sample")
    run_sample(SampleConfig(
        model=str(paths["model"]), prompts=(DEMO_PROMPT,), output=str(paths["sample"]), lora=str(paths["run"]),
        frames=frames, height=height, width=width, steps=10, overwrite=True,
    ))
    _report_outputs(paths)
    return paths


def _report_outputs(paths: dict[str, Path]) -> None:
    from cogtune.train.run_folder import FINAL_PASS, RunFolder

    run = RunFolder(paths["run"])
    report.key_values("demo outputs", [
        ("model (usable as --model)", paths["model"]),
        ("dataset", paths["data"]),
        ("latent cache", paths["cache"]),
        ("LoRA weights", run.lora_weights),
        ("loss curve (and held-out loss)", run.loss_curve),
        ("base | LoRA video", run.comparison(FINAL_PASS) / "00.mp4"),
        ("memory table", run.memory),
        ("sample video", paths["sample"]),
    ])
    report.info("the tiny model is random and minutes of CPU training teach it little: its videos look like noise. "
                "That is expected; the demo shows the pipeline works end to end, not what a real model learns.")
