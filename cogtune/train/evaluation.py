"""What the LoRA learned: the held-out loss, the LoRA's measured effect, and the warnings they lead to.

An evaluation scores every held-out item (`cogtune.train.heldout`) at `evaluation.timesteps` fixed
timesteps spread over the schedule (the middle of equal ranges), with noise fixed per item: the item's
generator is seeded by its id alone, so the figure is the same function of the weights at every step,
in every run on the same items, and after a resume. The inputs are built by the training step's own
code (`draw_step_inputs`, `make_transformer_inputs`) and scored by its loss (`prediction_losses`).

At the same inputs the transformer runs once more with its LoRA switched off (peft's switch,
`cogtune.lora.switch`): the relative difference of the two predictions, `||v_lora - v_base|| /
||v_base||`, is the LoRA's effect (0 for a LoRA whose B matrices are zero), and the base's loss is the
held-out loss the LoRA should beat. Without held-out items the effect is still measured, on a probe of
training items (no loss is reported for them).

Warnings, one line each and once per run: a LoRA whose effect stays under `effect_threshold` after
`effect_warn_after` of the run, and a held-out loss that rose for `overfit_evaluations` evaluations in a
row while the training loss fell (naming the best step so far).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from cogtune import report
from cogtune.fsutil import atomic_write_text
from cogtune.lora.switch import lora_disabled, lora_layers
from cogtune.models.registry import ModelSpec
from cogtune.train.config import TrainConfig
from cogtune.train.data import load_batch
from cogtune.train.heldout import HeldOut
from cogtune.train.step import (StepInputs, StepSettings, derive_seed, draw_step_inputs, make_transformer_inputs,
                                prediction_losses)

TIMESTEP_RANGES = 4  # the training loss is also reported by quarter of the schedule


@dataclasses.dataclass
class Evaluation:
    """One evaluation, as `RunFolder.evaluation` records it."""

    step: int
    loss: float | None  # the held-out loss (None: no held-out items, a probe of training items)
    base_loss: float | None  # the same with the LoRA off (None for full fine-tuning)
    effect: float | None  # ||v_lora - v_base|| / ||v_base|| (None for full fine-tuning)
    seconds: float
    train_loss: float | None  # the mean training loss since the previous evaluation


def fixed_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """`count` timesteps spread over the schedule: the middle of each of `count` equal ranges."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def item_generator(item_id: str) -> Any:
    """The generator of an item's fixed draws (latent, noise): seeded by the item's id only."""
    return torch.Generator().manual_seed(derive_seed("heldout", item_id))


def heldout_inputs(spec: ModelSpec, scheduler: Any, held: HeldOut, index: int) -> StepInputs:
    """An item's fixed draws (batch of one), as a training step draws them, with no caption or image dropout."""
    batch = load_batch(held.cache, [index])
    return draw_step_inputs(spec, scheduler, batch, held.cache.empty_prompt_embeds(), StepSettings(),
                            [item_generator(held.item_id(index))])


class Evaluator:
    """Scores the in-training model on the held-out items (or the probe); every process runs the same forwards."""

    def __init__(self, config: TrainConfig, spec: ModelSpec, held: HeldOut, scheduler: Any, accelerator: Any,
                 compute_dtype: Any):
        self.config, self.spec, self.held = config, spec, held
        self.scheduler, self.accelerator, self.compute_dtype = scheduler, accelerator, compute_dtype
        self.timesteps = fixed_timesteps(scheduler.config.num_train_timesteps, config.evaluation.timesteps)

    @property
    def measures(self) -> bool:
        """Whether an evaluation says anything: a held-out loss, or the effect of a LoRA (not of a full fine-tune)."""
        return self.held.held_out or not self.config.full

    def due(self, step: int) -> bool:
        """Whether the loop evaluates after `step` (the finish evaluates after the last)."""
        if not self.measures:
            return False
        validates = bool(self.config.validation.every) and step % self.config.validation.every == 0
        return validates or (self.held.held_out and step % self.config.evaluation.every_for(self.config.steps) == 0)

    def evaluate(self, transformer: Any, step: int, train_loss: float | None) -> Evaluation:
        started = time.perf_counter()
        unwrapped = self.accelerator.unwrap_model(transformer)
        has_lora = bool(lora_layers(unwrapped))
        was_training = unwrapped.training
        unwrapped.eval()  # LoRA dropout off: the same function of the weights every time
        sums = dict.fromkeys(("loss", "base_loss", "difference", "base"), 0.0)
        try:
            with torch.no_grad():
                for index in self.held.indices:
                    self._score_item(transformer, unwrapped, has_lora, index, sums)
        finally:
            if was_training:
                unwrapped.train()
        count = len(self.held.indices) * len(self.timesteps)
        effect = (sums["difference"] / sums["base"]) ** 0.5 if has_lora and sums["base"] > 0 else None
        return Evaluation(step=step, loss=sums["loss"] / count if self.held.held_out else None,
                          base_loss=sums["base_loss"] / count if has_lora and self.held.held_out else None,
                          effect=0.0 if has_lora and effect is None else effect,
                          seconds=time.perf_counter() - started, train_loss=train_loss)

    def _score_item(self, transformer: Any, unwrapped: Any, has_lora: bool, index: int, sums: dict[str, float]) -> None:
        device = self.accelerator.device
        drawn = heldout_inputs(self.spec, self.scheduler, self.held, index)
        for timestep in self.timesteps:
            at = dataclasses.replace(drawn, timesteps=torch.tensor([timestep]))
            inputs = make_transformer_inputs(self.spec, self.scheduler, at, device, self.compute_dtype)
            with self.accelerator.autocast():
                output = transformer(**inputs.kwargs, return_dict=False)[0]
                sums["loss"] += float(prediction_losses(output, inputs, self.scheduler).sum())
                if not has_lora:
                    continue
                with lora_disabled(unwrapped):
                    base = transformer(**inputs.kwargs, return_dict=False)[0]
            sums["base_loss"] += float(prediction_losses(base, inputs, self.scheduler).sum())
            sums["difference"] += float(((output.float() - base.float()) ** 2).sum())
            sums["base"] += float((base.float() ** 2).sum())


# --- the run's record of its evaluations, and what it says ----------------------------------------


class EvaluationLog:
    """Every evaluation of the run (a resumed run's earlier ones too), and the warnings given so far."""

    def __init__(self, config: TrainConfig, records: list[Evaluation] | None = None):
        self.config = config
        self.records: list[Evaluation] = records or []
        self.warned_effect = False
        self.warned_overfit = False

    @classmethod
    def read(cls, config: TrainConfig, path: Path, up_to_step: int) -> EvaluationLog:
        """The evaluations a resumed run made up to its checkpoint's step (later ones are made again)."""
        try:
            rows = json.loads(path.read_text(encoding="utf-8")).get("evaluations", [])
            records = [Evaluation(**row) for row in rows if row["step"] <= up_to_step]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            records = []  # no record, or not one this cogtune wrote: the evaluations start afresh
        return cls(config, records)

    def write(self, path: Path) -> None:
        rows = [dataclasses.asdict(record) for record in self.records]
        atomic_write_text(path, json.dumps({"evaluations": rows}, indent=2) + "\n")

    def add(self, record: Evaluation) -> bool:
        """Record an evaluation; whether its held-out loss is the lowest so far. Warns as the module says."""
        earlier = self.best()
        self.records = [r for r in self.records if r.step != record.step] + [record]
        self._warn_about_effect(record)
        self._warn_about_overfitting()
        return record.loss is not None and (earlier is None or record.loss < earlier.loss)

    def made(self, step: int) -> bool:
        """Whether the evaluation after `step` is recorded (a run completing its cut-short finish has it)."""
        return any(record.step == step for record in self.records)

    def best(self) -> Evaluation | None:
        scored = [record for record in self.records if record.loss is not None]
        return min(scored, key=lambda record: record.loss) if scored else None

    def _warn_about_effect(self, record: Evaluation) -> None:
        settings = self.config.evaluation
        if self.warned_effect or record.effect is None or record.effect >= settings.effect_threshold:
            return
        if record.step < settings.effect_warn_after * self.config.steps:
            return
        self.warned_effect = True
        report.warn(f"the LoRA has almost no effect: at step {record.step} its predictions differ from the base "
                    f"model's by {record.effect:.2g} (relative; near zero is under {settings.effect_threshold:g}). "
                    f"Usual causes: the learning rate (--lr), the alpha/rank scale (--lora-alpha, --rank), target "
                    f"modules that miss what matters (--lora-target), too few steps (--steps)", shared=True)

    def _warn_about_overfitting(self) -> None:
        rises = self.config.evaluation.overfit_evaluations
        scored = [record for record in self.records if record.loss is not None and record.train_loss is not None]
        if self.warned_overfit or len(scored) < rises + 1:
            return
        window = scored[-(rises + 1):]
        rising = all(later.loss > earlier.loss for earlier, later in zip(window, window[1:]))
        if not rising or window[-1].train_loss >= window[0].train_loss:
            return
        self.warned_overfit = True
        best = self.best()
        report.warn(f"the held-out loss rose for {rises} evaluations ({window[0].loss:.4g} at step {window[0].step} "
                    f"-> {window[-1].loss:.4g} at step {window[-1].step}) while the training loss fell: the LoRA may "
                    f"be overfitting; the best held-out loss so far is {best.loss:.4g} at step {best.step}"
                    + ("" if self.config.evaluation.keep_best else " (--keep-best keeps its weights)"), shared=True)

    def summary(self) -> dict[str, Any]:
        """What training_summary.json and the run's last table say about the evaluations."""
        if not self.records:
            return {}
        last, best = self.records[-1], self.best()
        seconds = [record.seconds for record in self.records]
        summary: dict[str, Any] = {"evaluations": len(self.records),
                                   "seconds_per_evaluation": round(sum(seconds) / len(seconds), 4),
                                   "last_step": last.step, "last_effect": last.effect}
        if best is not None:
            summary.update(best_step=best.step, best_loss=best.loss, last_loss=last.loss, base_loss=last.base_loss)
        return summary


def timestep_range_losses(pairs: list[tuple[int, float]], num_train_timesteps: int,
                          ranges: int = TIMESTEP_RANGES) -> list[dict[str, Any]]:
    """The training loss by range of timesteps (the raw loss mixes easy and hard ones): mean and count per range."""
    width = num_train_timesteps / ranges
    rows = []
    for k in range(ranges):
        low, high = int(k * width), int((k + 1) * width) - 1
        losses = [loss for timestep, loss in pairs if low <= timestep <= high]
        rows.append({"timesteps": f"{low}-{high}", "mean_loss": sum(losses) / len(losses) if losses else None,
                     "samples": len(losses)})
    return rows


def print_evaluation_summary(summary: dict[str, Any], ranges: list[dict[str, Any]]) -> None:
    """The end of the run's table: the held-out loss (best, last, the base's), the effect, the cost."""
    rows: list[tuple[str, Any]] = []
    if "best_step" in summary:
        rows += [("held-out loss, best", f"{summary['best_loss']:.5g} at step {summary['best_step']}"),
                 ("held-out loss, last", f"{summary['last_loss']:.5g} at step {summary['last_step']}")]
        if summary.get("base_loss") is not None:
            rows.append(("held-out loss, base model", f"{summary['base_loss']:.5g}"))
    if summary.get("last_effect") is not None:
        rows.append(("LoRA effect (relative)", f"{summary['last_effect']:.3g} at step {summary['last_step']}"))
    if summary:
        rows.append(("time per evaluation", f"{summary['seconds_per_evaluation']:.2f} s "
                                            f"({report.plural(summary['evaluations'], 'evaluation')})"))
    rows += [(f"training loss, t {row['timesteps']}", f"{row['mean_loss']:.5g} ({report.plural(row['samples'], 'sample')})")
             for row in ranges if row["mean_loss"] is not None]
    if rows:
        report.key_values("evaluation", rows, to_stderr=True)


def model_card_lines(path: Path) -> list[str]:
    """The model card's section on the held-out loss, from the run's `RunFolder.evaluation` (none without one)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("evaluations", [])
    except (OSError, ValueError, AttributeError):
        return []
    scored = [row for row in rows if isinstance(row, dict) and row.get("loss") is not None]
    if not scored:
        return []
    best = min(scored, key=lambda row: row["loss"])
    lines = ["## Held-out loss", "",
             f"Scored on held-out items at fixed timesteps and noise (lower is better); best {best['loss']:.5g} at "
             f"step {best['step']}.", "", "| step | held-out loss | base model | LoRA effect |", "| --- | --- | --- | --- |"]
    for row in scored:
        base = f"{row['base_loss']:.5g}" if row.get("base_loss") is not None else "-"
        effect = f"{row['effect']:.3g}" if row.get("effect") is not None else "-"
        lines.append(f"| {row['step']} | {row['loss']:.5g} | {base} | {effect} |")
    return [*lines, ""]
