"""The model card (`README.md`) every run folder gets, and `--push-to-hub` uploads.

Built with huggingface_hub's `ModelCard`/`ModelCardData`: YAML metadata the Hub reads (base model,
library, tags, the base model's license when cogtune knows it), then what a user needs: the base
model, the trigger word the captions were encoded with, the main settings, a GIF of a validation
video, and the diffusers snippet that loads the weights (the pipeline class for the task, the
adapter at the scale it was trained with).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cogtune import __version__
from cogtune.fsutil import atomic_write_bytes, atomic_write_text
from cogtune.lora.layouts import trained_against
from cogtune.train.config import TrainConfig
from cogtune.train.plan import RunPlan
from cogtune.train.run_folder import RunFolder

# The licenses of the published CogVideoX weights (their model cards' metadata): 2b is Apache 2.0,
# the 5b models and 1.5 carry the CogVideoX license.
_COGVIDEOX_LICENSE = {"license": "other", "license_name": "cogvideox-license"}
BASE_LICENSES: dict[str, dict[str, str]] = {
    "thudm/cogvideox-2b": {"license": "apache-2.0"},
    **{hub_id: _COGVIDEOX_LICENSE for hub_id in ("thudm/cogvideox-5b", "thudm/cogvideox-5b-i2v",
                                                 "thudm/cogvideox1.5-5b", "thudm/cogvideox1.5-5b-i2v")},
}


@dataclasses.dataclass(frozen=True)
class ModelCardFiles:
    card: Path
    shown: list[str]  # other files the card shows (a validation GIF), relative to the run's folder


def write_model_card(config: TrainConfig, plan: RunPlan) -> ModelCardFiles:
    """Write OUT/README.md (and the GIF of the newest validation video it shows) atomically."""
    run = RunFolder.of(config)
    shown = []
    gif = _validation_gif(run, plan.model.spec.fps)
    if gif is not None:
        shown.append(gif.relative_to(run.root).as_posix())
    card = model_card(config, plan, shown[0] if shown else None)
    path = atomic_write_text(run.model_card, card)
    return ModelCardFiles(path, shown)


def model_card(config: TrainConfig, plan: RunPlan, gif: str | None = None) -> str:
    """The card's text: YAML front matter, then the body."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = plan.model.spec
    task_tag = "image-to-video" if spec.is_i2v else "text-to-video"
    base = _base_model(plan)
    license_fields = BASE_LICENSES.get((base or "").lower(), {})
    if license_fields.get("license") == "other":
        license_fields = {**license_fields, "license_link": f"https://huggingface.co/{base}/blob/main/LICENSE"}
    # A local folder is not a base_model the Hub accepts (it checks the id): left out, named in the body.
    data = ModelCardData(
        base_model=base, library_name="diffusers", pipeline_tag=task_tag,
        tags=[task_tag, *([] if config.full else ["lora"]), "cogvideox", "cogtune", "diffusers"],
        **license_fields,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(config, plan, base, gif)}")
    return str(card)


def _base_model(plan: RunPlan) -> str | None:
    """The base model's Hub id, or the preset name of a tiny test model; None for a local folder."""
    model = plan.model
    if model.spec.hub_id:
        return model.spec.hub_id
    if model.source == "hub":
        return model.location
    return model.reference if model.source == "tiny" else None


def _body(config: TrainConfig, plan: RunPlan, base: str | None, gif: str | None) -> str:
    from cogtune.models.loading import pipeline_class
    from cogtune.train.evaluation import model_card_lines
    from cogtune.train.validation import validation_shape

    spec = plan.model.spec
    name = Path(config.push_to_hub or Path(config.output_dir).resolve().name).name
    base_text = f"[{base}](https://huggingface.co/{base})" if base and "/" in base else f"`{base or plan.model.reference}`"
    kind = "full fine-tune" if config.full else "LoRA"
    id_token = plan.cache.manifest.get("id_token")
    lines = [f"# {name}", "",
             f"{'An image' if spec.is_i2v else 'A text'}-to-video {kind} of {base_text}, trained with "
             f"cogtune {__version__}.", ""]
    if id_token:
        lines += [f"**Trigger:** every training caption started with `{id_token}`; start your prompts with it.", ""]
    if gif is not None:
        prompt = plan.validation_prompts[0] if plan.validation_prompts else ""
        lines += [f"![validation video]({gif})", ""]
        if prompt:
            lines += [f"*{_markdown_text(prompt)}*", ""]
    opt = config.optimizer
    method = ("full fine-tuning" if config.full else
              f"LoRA rank {config.lora.rank}, alpha {config.lora.effective_alpha:g} "
              f"({', '.join(config.lora.target_modules)})")
    rows = [("base model", base_text), ("task", config.task), ("method", method), ("steps", str(config.steps)),
            ("learning rate", f"{opt.effective_lr:g} ({opt.name}, {opt.lr_schedule}, {opt.warmup_steps} warm-up steps)"),
            ("batch", f"{config.batch_size} per process x {config.gradient_accumulation} accumulation"),
            ("buckets (frames x height x width)", ", ".join(plan.cache.buckets)),
            ("training items", _training_items(config, plan)), ("seed", str(config.seed))]
    if id_token:
        rows.insert(3, ("trigger", f"`{id_token}`"))
    if plan.drop_learned_positions:
        rows.append(("positional embeddings", "learned ones dropped (rotary only)"))
    storage = trained_against({"base_weights": config.memory.base_weights, "nf4_backend": config.memory.nf4_backend})
    if storage:
        rows.append(("base weights", storage))
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {_markdown_text(value)} |" for key, value in rows]
    lines += ["", *model_card_lines(RunFolder.of(config).evaluation)]
    frames, height, width = validation_shape(config, plan.cache)
    lines += ["## Use with diffusers", "", "```python",
              _snippet(config, plan, pipeline_class(spec).__name__, base, (frames, height, width), id_token),
              "```", "",
              "The full settings are in `config.toml`; `cogtune sample --lora` samples it too.", ""]
    return "\n".join(lines)


def _training_items(config: TrainConfig, plan: RunPlan) -> str:
    from cogtune.train.heldout import held_out_of_training

    held = held_out_of_training(config)
    return f"{len(plan.cache) - held} ({held} more held out)" if held else str(len(plan.cache))


def _snippet(config: TrainConfig, plan: RunPlan, pipeline: str, base: str | None, shape: tuple[int, int, int],
             id_token: str | None) -> str:
    spec = plan.model.spec
    dtype = {"float16": "torch.float16", "bfloat16": "torch.bfloat16"}.get(spec.weight_dtype, "torch.float32")
    weights = config.push_to_hub or config.output_dir
    frames, height, width = shape
    prompt = plan.validation_prompts[0] if plan.validation_prompts else "A video of ..."
    if id_token and not prompt.startswith(id_token):
        prompt = f"{id_token} {prompt}"
    imports = ["import torch", f"from diffusers import {pipeline}"
               + (", CogVideoXTransformer3DModel" if config.full else ""),
               "from diffusers.utils import export_to_video" + (", load_image" if spec.is_i2v else ""), ""]
    if config.full:
        load = [f"transformer = CogVideoXTransformer3DModel.from_pretrained({_py(weights)}, subfolder=\"transformer\", "
                f"torch_dtype={dtype})",
                f"pipe = {pipeline}.from_pretrained({_py(base or plan.model.reference)}, transformer=transformer, "
                f"torch_dtype={dtype}).to(\"cuda\")"]
    else:
        load = [f"pipe = {pipeline}.from_pretrained({_py(base or plan.model.reference)}, torch_dtype={dtype}).to(\"cuda\")",
                f"pipe.load_lora_weights({_py(weights)}, adapter_name=\"cogtune\")",
                "# 1.0 is the trained strength: the file records alpha, so diffusers applies alpha / rank itself",
                "pipe.set_adapters([\"cogtune\"], [1.0])"]
    if plan.drop_learned_positions:
        load.append("pipe.transformer.patch_embed.use_learned_positional_embeddings = False  # as it was trained")
    image = ["image = load_image(\"first_frame.png\")  # the condition image"] if spec.is_i2v else []
    call = (f"video = pipe({'image=image, ' if spec.is_i2v else ''}prompt={_py(prompt)}, num_frames={frames}, "
            f"height={height}, width={width}, guidance_scale={config.validation.guidance:g}, "
            f"num_inference_steps=50).frames[0]")
    return "\n".join([*imports, *load, *image, call, f"export_to_video(video, \"output.mp4\", fps={spec.fps})"])


def _validation_gif(run: RunFolder, fps: int) -> Path | None:
    """A GIF of the first video of the newest validation pass (`final`, else the last step), beside the
    card (not among the validation videos, which stay one mp4 per prompt)."""
    from cogtune.train.tracking import video_gif

    passes = sorted(run.validation_videos.glob("step-*"))
    final = run.final_validation
    for folder in ([final] if final.is_dir() else []) + passes[::-1]:
        videos = sorted(folder.glob("*.mp4"))
        if videos:
            return atomic_write_bytes(run.model_card_gif, video_gif(videos[0], fps))
    return None


def _py(text: str) -> str:
    """A Python string literal in double quotes (a JSON string is one)."""
    return json.dumps(text, ensure_ascii=False)


def _markdown_text(text: Any) -> str:
    """Text inside a table cell or emphasis: no line breaks, no pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")
