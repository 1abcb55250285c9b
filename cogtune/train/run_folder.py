"""The run folder: every path a training run writes, named in one place.

`RunFolder(root)` answers where each of a run's files goes (`run.memory`, `run.checkpoint(step)`,
`run.validation("final")`, `run.weights(full)`, ...), and every module that writes or reads a run's
files asks it. Each output is declared once, as an `_Output` on the class; the declarations are
also the list of what a run writes (`RunFolder.outputs()`), which is what `--overwrite` deletes, so
a new output declared here is covered by it too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import overload

from cogtune import report
from cogtune.config import CONFIG_FILENAME
from cogtune.errors import ConfigError
from cogtune.fsutil import remove_tree
from cogtune.lora.format import LAYOUT_FILE_NAMES, LORA_WEIGHTS_NAME
from cogtune.train.config import TrainConfig


class _Output:
    """One file or folder a run writes, `name` inside the run's folder: on a `RunFolder`, its path.

    `marks_a_run`: a folder holding it holds a (finished or interrupted) training run.
    """

    def __init__(self, name: str, marks_a_run: bool = False):
        self.name = name
        self.marks_a_run = marks_a_run

    @overload
    def __get__(self, folder: None, owner: type) -> _Output: ...

    @overload
    def __get__(self, folder: RunFolder, owner: type) -> Path: ...

    def __get__(self, folder: RunFolder | None, owner: type) -> Path | _Output:
        return self if folder is None else folder.root / self.name


FINAL_PASS = "final"  # the validation pass after the last step
COMPARISON_FOLDER = "base-vs-lora"  # inside a validation pass: the side-by-side videos


def step_name(step: int) -> str:
    """The name of a step's checkpoint and of its validation pass: `step-000100`."""
    return f"step-{step:06d}"


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A training run's output folder (`--output-dir`) and every path the run writes in it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str is welcome too

    # What a run leaves whether it finished or was interrupted: a folder holding one of these holds a run.
    config_file = _Output(CONFIG_FILENAME, marks_a_run=True)  # the resolved settings (`cogtune.config`)
    checkpoints = _Output("checkpoints", marks_a_run=True)  # `step-NNNNNN/` folders (`cogtune.train.checkpoint`)
    lora_weights = _Output(LORA_WEIGHTS_NAME, marks_a_run=True)  # a LoRA run's final weights
    transformer = _Output("transformer", marks_a_run=True)  # a full fine-tune's final weights, a diffusers folder
    summary = _Output("training_summary.json", marks_a_run=True)  # losses, learning rates, step times
    # Everything else a run writes.
    memory = _Output("memory.json")  # the memory snapshots (`cogtune.train.memory`), read by `bench --measure`
    loss_curve = _Output("loss.png")
    validation_videos = _Output("validation")  # `step-NNNNNN/` and `final/` folders of `NN.mp4` videos
    logs = _Output("logs")  # the trackers' (`--report-to`) files
    validation_prompts = _Output("validation_prompts.safetensors")  # the validation prompts' embeddings
    model_card = _Output("README.md")  # replaced only when cogtune wrote it (`is_model_card`)
    model_card_gif = _Output("model_card.gif")  # the validation video the card shows
    heldout_items = _Output("heldout_items.json")  # the items `--eval-split` keeps out of training, by id
    evaluation = _Output("evaluation.json")  # each evaluation: held-out loss, the LoRA's effect, its time
    best = _Output("best")  # `--keep-best`: the weights of the lowest held-out loss, as in a checkpoint

    @classmethod
    def of(cls, config: TrainConfig) -> RunFolder:
        return cls(Path(config.output_dir))

    @classmethod
    def outputs(cls) -> list[str]:
        """The names of everything a run writes into its folder, the `--save-format` layouts included."""
        declared = [value.name for value in vars(cls).values() if isinstance(value, _Output)]
        return [*declared, *LAYOUT_FILE_NAMES.values()]

    @classmethod
    def markers(cls) -> list[str]:
        """The names whose presence says a folder holds a training run."""
        return [value.name for value in vars(cls).values() if isinstance(value, _Output) and value.marks_a_run]

    def written_by(self, record: dict) -> list[str]:
        """What the run whose config.toml is `record` may have written here: its kind of weights (not the
        other kind's name), its `--save-format` layouts, logs only with a tracker, its model card only if
        cogtune wrote it."""
        full = bool(record.get("full"))
        lora = record.get("lora") if isinstance(record.get("lora"), dict) else {}
        layouts = {name.strip() for name in str(lora.get("save_format", "")).split(",")}
        skipped = {self.weights(not full).name, *(LAYOUT_FILE_NAMES[name] for name in LAYOUT_FILE_NAMES
                                                  if name not in layouts)}
        if record.get("report_to", "none") == "none":
            skipped.add(self.logs.name)
        if not is_model_card(self.model_card):
            skipped.add(self.model_card.name)
        return [name for name in self.outputs() if name not in skipped]

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def validation(self, name: str) -> Path:
        """The folder of one validation pass: `step_name(step)` or `FINAL_PASS`."""
        return self.validation_videos / name

    def comparison(self, name: str) -> Path:
        """The base | LoRA side-by-side videos of one validation pass (`NN.mp4`), beside its own videos."""
        return self.validation(name) / COMPARISON_FOLDER

    @property
    def final_validation(self) -> Path:
        return self.validation(FINAL_PASS)

    def weights(self, full: bool) -> Path:
        """The trainable weights: the LoRA file, or the `transformer/` folder of a full fine-tune."""
        return self.transformer if full else self.lora_weights

    def layout(self, name: str) -> Path:
        """The LoRA file in another layout (`--save-format comfyui`), beside the diffusers one."""
        return self.root / LAYOUT_FILE_NAMES[name]


def weights_in(folder: Path, full: bool) -> Path:
    """The trainable weights in a run's folder or in one of its checkpoints, which hold them alike."""
    return RunFolder(folder).weights(full)


def is_model_card(path: Path) -> bool:
    """Whether `path` is a model card cogtune wrote: YAML front matter whose tags include `cogtune`."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:8192]
    except OSError:
        return False
    parts = text.split("---", 2)
    return text.startswith("---") and len(parts) == 3 and any(
        line.strip() == "- cogtune" for line in parts[1].splitlines())


def run_record(folder: Path) -> dict | None:
    """The settings a training run recorded in `folder` (its config.toml), or None when the folder holds
    no training run's record (no config.toml, or another command's: a cache's, a sample's)."""
    import tomllib

    try:
        record = tomllib.loads((folder / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    return record if record.get("task") in ("t2v", "i2v") and set(record) <= fields else None


# What other folders hold, to say what a folder that is no training run is.
_FOREIGN = (("model_index.json", "a diffusers pipeline (model_index.json)"),
            ("manifest.json", "a cogtune latent cache (manifest.json)"),
            ("prepare.json", "a prepared dataset (prepare.json)"),
            ("transformer/config.json", "a diffusers model (transformer/config.json)"),
            ("config.json", "a model (config.json)"))


def check_run_folder(config: TrainConfig) -> None:
    """The run writes into a new folder, its own earlier run's (`--resume`, or `--overwrite`: starting over),
    or a folder of the user's that holds nothing a run writes; never into a model, a cache or a dataset.

    `--overwrite` deletes only what the earlier run's record (its config.toml) says that run wrote.
    """
    run = RunFolder.of(config)
    card = run.model_card
    if card.exists() and not is_model_card(card):
        raise ConfigError(f"{card} is not a model card cogtune wrote, and the run writes its model card there; "
                          "refusing to replace it", hint="move that file, or train into another --output-dir")
    if not run.root.is_dir():
        return
    found = [name for name in RunFolder.markers() if (run.root / name).exists()]
    record = run_record(run.root)
    if found and record is None:
        what = next((text for name, text in _FOREIGN if (run.root / name).exists()),
                    f"{', '.join(found)} that no training run recorded")
        raise ConfigError(f"{run.root} is not a cogtune training run: it holds {what}; refusing to train into it "
                          "or delete anything there", hint="train into a new or empty --output-dir")
    if config.resume is not None or not found:
        return
    if not config.overwrite:
        raise ConfigError(f"{run.root} already holds a training run ({', '.join(found)}); refusing to write over it",
                          hint="continue it with --resume latest, start over with --overwrite, or train into a new "
                               "--output-dir")
    deleted = [name for name in run.written_by(record) if _delete(run.root / name)]
    report.warn(f"--overwrite: deleted the previous run's outputs in {run.root} ({', '.join(deleted)})")


def _delete(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True
