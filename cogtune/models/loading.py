"""Resolve a MODEL argument and load its components through diffusers and transformers.

A MODEL is a preset name (`cogvideox-5b`), a tiny preset (`tiny`, `tiny-i2v`, ...), a Hub id
(`THUDM/CogVideoX-5b`) or a local diffusers folder. `resolve_model` reads only configs (from the
registry, the folder, or the Hub), so every check happens before any weight is loaded.
`random_weights=True` keeps the real architecture and initializes it randomly, on the meta
device first and then directly where it runs, with nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights

from cogtune import report
from cogtune.errors import ModelError
from cogtune.models.registry import (
    ALL_PRESETS,
    PRESETS,
    TINY_PRESETS,
    ModelSpec,
    preset_for_hub_id,
    spec_from_configs,
)

# "fake": the architecture with uninitialized storage, for tracing memory under a FakeTensorMode.
Source = Literal["tiny", "local", "hub", "random", "fake"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# huggingface_hub 2.x ships the `hf` command (`huggingface-cli` is gone).
_OFFLINE_HINT = (
    "download it first (`hf download {id} --local-dir DIR`) and pass the folder, or use "
    "`--random-weights` with a preset for sizing and benchmarks"
)
_UNREACHABLE_HINT = (
    "pass a local folder (`hf download {id} --local-dir DIR` where there is a network), or set "
    "HF_HUB_OFFLINE=1 to use the copy in the Hugging Face cache"
)
# Weights that diffusers and transformers load only when a folder has no safetensors.
_NOT_SAFETENSORS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data"]


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A MODEL argument, resolved: its spec, and where its weights come from."""

    reference: str
    spec: ModelSpec
    source: Source
    location: str | None  # folder or Hub id; None for random weights
    revision: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "source": self.source,
            "location": self.location,
            "revision": self.revision,
            **self.spec.describe(),
        }


def resolve_model(reference: str, random_weights: bool = False, revision: str | None = None) -> ResolvedModel:
    """Turn a MODEL argument into a `ResolvedModel`, reading configs only."""
    reference = str(reference).strip()
    if not reference:
        raise ModelError("empty model reference")
    if reference in TINY_PRESETS:
        from cogtune.models.tiny import ensure_tiny_model

        return ResolvedModel(reference, TINY_PRESETS[reference], "tiny", str(ensure_tiny_model(reference)))
    if reference in PRESETS:
        spec = PRESETS[reference]
        if random_weights:
            return ResolvedModel(reference, spec, "random", None)
        return ResolvedModel(reference, spec, "hub", spec.hub_id, revision)
    path = Path(reference).expanduser()
    if path.exists():
        spec = _spec_from_folder(path)
        if random_weights:
            return ResolvedModel(reference, spec, "random", None)
        return ResolvedModel(reference, spec, "local", str(path.resolve()))
    if _HUB_ID.match(reference):
        spec = preset_for_hub_id(reference)
        if spec is None:
            check_hub_reachable(reference)
            spec = _spec_from_hub(reference, revision)
        else:
            spec = dataclasses.replace(spec, name=reference)
        if random_weights:
            return ResolvedModel(reference, spec, "random", None)
        return ResolvedModel(reference, spec, "hub", reference, revision)
    known = ", ".join(ALL_PRESETS)
    raise ModelError(
        f"unknown model '{reference}': not a preset, a Hub id (org/name) or an existing folder",
        hint=f"presets: {known}",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is missing; is this a diffusers CogVideoX folder?") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc


def _spec_from_folder(path: Path) -> ModelSpec:
    if not path.is_dir():
        raise ModelError(f"{path} is a file; expected a diffusers pipeline folder with model_index.json")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} has no model_index.json; expected a diffusers CogVideoX pipeline folder")
    index = _read_json(path / "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))
    if "CogVideoX" not in pipeline_class:
        raise ModelError(f"{path} holds a {pipeline_class or 'unknown'} pipeline, not a CogVideoX one")
    scheduler_entry = index.get("scheduler") or ["diffusers", "CogVideoXDDIMScheduler"]
    text_encoder_config = None
    if (path / "text_encoder" / "config.json").is_file():
        text_encoder_config = _read_json(path / "text_encoder" / "config.json")
    preset_file = path / "cogtune_preset.json"
    name = _read_json(preset_file).get("preset", str(path)) if preset_file.is_file() else str(path)
    return spec_from_configs(
        name=name,
        transformer_config=_read_json(path / "transformer" / "config.json"),
        vae_config=_read_json(path / "vae" / "config.json"),
        scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json"),
        text_encoder_config=_t5_architecture(text_encoder_config),
        scheduler_class=str(scheduler_entry[1]),
    )


def _t5_architecture(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "feed_forward_proj",
            "is_encoder_decoder", "tie_word_embeddings", "pad_token_id", "eos_token_id")
    return {k: config[k] for k in keys if k in config}


def _spec_from_hub(repo_id: str, revision: str | None) -> ModelSpec:
    from huggingface_hub import hf_hub_download

    offline = hub_offline_mode()  # as set now, even where huggingface_hub read HF_HUB_OFFLINE at import

    def fetch(filename: str) -> dict[str, Any]:
        try:
            return _read_json(Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)))
        except ModelError:
            raise
        except Exception as exc:  # network, auth, missing repo: all end the same way for the user
            raise ModelError(
                f"could not read {filename} of '{repo_id}' from the Hugging Face Hub: {_first_line(exc)}",
                hint=_OFFLINE_HINT.format(id=repo_id),
            ) from exc

    index = fetch("model_index.json")
    if "CogVideoX" not in str(index.get("_class_name", "")):
        raise ModelError(f"'{repo_id}' is a {index.get('_class_name', 'unknown')} pipeline, not a CogVideoX one")
    return spec_from_configs(
        name=repo_id,
        hub_id=repo_id,
        transformer_config=fetch("transformer/config.json"),
        vae_config=fetch("vae/config.json"),
        scheduler_config=fetch("scheduler/scheduler_config.json"),
        text_encoder_config=_t5_architecture(fetch("text_encoder/config.json")),
        scheduler_class=str((index.get("scheduler") or ["", "CogVideoXDDIMScheduler"])[1]),
    )


def hub_offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now: huggingface_hub reads it once, at import, which may be too early."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_hub_reachable(repo_id: str) -> None:
    """One line at once when the Hub cannot be reached, instead of a minute of retries.

    In offline mode nothing is asked: the cache answers, or loading says what is missing.
    """
    if hub_offline_mode():
        return
    endpoint = hub_endpoint()
    reason = _unreachable_reason(endpoint)
    if reason:
        raise ModelError(f"cannot reach the Hugging Face Hub at {endpoint} to get '{repo_id}' ({reason})",
                         hint=_UNREACHABLE_HINT.format(id=repo_id))


@functools.lru_cache(maxsize=None)
def _unreachable_reason(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why `endpoint` cannot be reached (no network, refused, timed out), or None when it answers.

    One request, no retries, through huggingface_hub's own HTTP client (its proxies and headers);
    any HTTP answer, an error status included, means the Hub is there.
    """
    import httpx2  # huggingface_hub 2.x's HTTP library
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except httpx2.TimeoutException:
        return f"no answer within {timeout:.0f} s"
    except httpx2.TransportError as exc:
        return _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- dtypes and devices ----------------------------------------------------------------------

def torch_dtype(name: str):
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise ModelError(f"unknown dtype '{name}' (use float32, float16 or bfloat16)") from None


def available_host_bytes() -> int | None:
    """Host memory a new allocation can still get, in bytes: the kernel's `MemAvailable` plus free swap
    (`/proc/meminfo`), else the free pages the OS reports; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.split()[1:]}
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# --- loading ---------------------------------------------------------------------------------

def _from_pretrained(model: ResolvedModel, cls: Any, subfolder: str, **kwargs: Any) -> Any:
    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    online = model.source == "hub" and not kwargs.get("local_files_only") and not hub_offline_mode()
    if online:
        check_hub_reachable(model.location)
    elif model.source == "hub":  # offline as set now, even where a library read HF_HUB_OFFLINE at import
        kwargs["local_files_only"] = True
    try:
        if online and subfolder in _WEIGHT_FOLDERS:
            _download_with_progress(model, subfolder)
        return cls.from_pretrained(model.location, subfolder=subfolder, revision=model.revision, **kwargs)
    except Exception as exc:
        hint = _OFFLINE_HINT.format(id=model.location) if model.source == "hub" else None
        raise ModelError(f"could not load the {subfolder} of '{model.reference}': {_first_line(exc)}", hint) from exc


# Components with weights worth a byte bar (gigabytes); tokenizers and configs download unseen.
_WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder")


def _download_with_progress(model: ResolvedModel, subfolder: str) -> None:
    """Bring a Hub model's `subfolder` into the Hugging Face cache with a byte bar, so that
    `from_pretrained` finds it there; nothing shows when it is already cached."""
    from huggingface_hub import snapshot_download

    with report.hub_download_progress(f"downloading {subfolder}") as tqdm_class:
        snapshot_download(model.location, revision=model.revision, allow_patterns=[f"{subfolder}/*"],
                          ignore_patterns=_NOT_SAFETENSORS, tqdm_class=tqdm_class)


def materialize_random_(module, device: Any, dtype: Any, seed: int = 0, initialize: bool = True):
    """Give a module built on the meta device real, randomly initialized storage on `device`.

    Each parameter is allocated directly in `dtype` on `device` (no float32 copy on the host) and
    initialized by its layer's own `reset_parameters`; non-persistent buffers computed at
    construction (sincos positions) are kept. Tensors are replaced rather than converted in place,
    so this also works under a `FakeTensorMode` (the memory estimator's tracing).
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            target = dtype if param.is_floating_point() else param.dtype
            sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=target, device=device),
                                                       requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is None:
                continue
            target = dtype if buffer.is_floating_point() else buffer.dtype
            sub._buffers[name] = buffer.to(device=device, dtype=target)
    if not initialize:
        return module
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    with torch.no_grad():
        initialized: set[int] = set()
        for sub in module.modules():
            if hasattr(sub, "reset_parameters") and sub is not module:
                sub.reset_parameters()
                initialized.update(id(p) for p in sub.parameters(recurse=False))
        for param in module.parameters():
            if id(param) not in initialized:
                param.normal_(0.0, 0.02)
    torch.random.set_rng_state(generator_state)
    return module


def _build_random(model: ResolvedModel, cls_builder, device: Any, dtype: Any, seed: int):
    with init_empty_weights(include_buffers=False):
        module = cls_builder()
    return materialize_random_(module, device, dtype, seed, initialize=model.source == "random")


def load_transformer(model: ResolvedModel, dtype: Any = None, device: Any = "cpu", subfolder: str = "transformer"):
    """The CogVideoX transformer of `model`, in `dtype` (default: the model's own) on `device`."""
    from diffusers import CogVideoXTransformer3DModel

    dtype = dtype if dtype is not None else torch_dtype(model.spec.weight_dtype)
    if model.source in ("random", "fake"):
        return _build_random(model, lambda: CogVideoXTransformer3DModel(**model.spec.transformer_config), device,
                             dtype, 0)
    transformer = _from_pretrained(model, CogVideoXTransformer3DModel, subfolder, torch_dtype=dtype)
    return transformer.to(device)


def load_vae(model: ResolvedModel, dtype: Any = None, device: Any = "cpu"):
    from diffusers import AutoencoderKLCogVideoX

    dtype = dtype if dtype is not None else torch_dtype(model.spec.weight_dtype)
    if model.source in ("random", "fake"):
        return _build_random(model, lambda: AutoencoderKLCogVideoX(**model.spec.vae_config), device, dtype, 1)
    return _from_pretrained(model, AutoencoderKLCogVideoX, "vae", torch_dtype=dtype).to(device)


def load_text_encoder(model: ResolvedModel, dtype: Any = None, device: Any = "cpu"):
    from transformers import T5Config, T5EncoderModel

    dtype = dtype if dtype is not None else torch_dtype(model.spec.weight_dtype)
    if model.source in ("random", "fake"):
        config = T5Config(**model.spec.text_encoder_config)
        return _build_random(model, lambda: T5EncoderModel(config), device, dtype, 2)
    return _from_pretrained(model, T5EncoderModel, "text_encoder", torch_dtype=dtype).to(device)


def load_tokenizer(model: ResolvedModel, local_only: bool = False):
    """The model's T5 tokenizer; random-weights models get the offline stand-in (ids are in range).

    `local_only` reads a Hub model's tokenizer from the local cache only, never the network.
    """
    if model.source in ("random", "fake"):
        from cogtune.models.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer(model.spec.max_text_tokens)
    from transformers import AutoTokenizer

    if local_only and model.source == "hub":
        return _from_pretrained(model, AutoTokenizer, "tokenizer", local_files_only=True)
    return _from_pretrained(model, AutoTokenizer, "tokenizer")


def load_scheduler(model: ResolvedModel):
    """The training/sampling scheduler, from the model's own scheduler config."""
    import diffusers

    cls = getattr(diffusers, model.spec.scheduler_class, None) or diffusers.CogVideoXDDIMScheduler
    return cls.from_config(dict(model.spec.scheduler_config))


def pipeline_class(spec: ModelSpec):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    return CogVideoXImageToVideoPipeline if spec.is_i2v else CogVideoXPipeline


def build_pipeline(model: ResolvedModel, **components: Any):
    """The diffusers pipeline of `model` from components; those not given are loaded (or made up)."""
    spec = model.spec
    if "scheduler" not in components:
        components["scheduler"] = load_scheduler(model)
    if "tokenizer" not in components:
        components["tokenizer"] = load_tokenizer(model)
    for name, loader in (("transformer", load_transformer), ("vae", load_vae), ("text_encoder", load_text_encoder)):
        if name not in components:
            components[name] = loader(model)
    pipe = pipeline_class(spec)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(spec: ModelSpec) -> int:
    """Transformer parameter count, built on the meta device (no memory, no download)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**spec.transformer_config)
    return sum(p.numel() for p in transformer.parameters())


def _with_defaults(cls: Any, config: Any) -> dict[str, Any]:
    """`config` with `cls.__init__`'s defaults filled in, private keys dropped, as plain JSON values."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    given = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return json.loads(json.dumps({**defaults, **given}, default=list))


def transformer_architecture(spec: ModelSpec) -> dict[str, Any]:
    """The transformer's full constructor arguments: its config with diffusers' defaults filled in.

    A preset lists only what the published config lists, while a folder written by a newer
    diffusers lists every argument; both describe the same transformer when these agree.
    """
    from diffusers import CogVideoXTransformer3DModel

    return _with_defaults(CogVideoXTransformer3DModel, spec.transformer_config)


# What decides the latents a VAE makes (its tiling thresholds and upcasting do not), and the
# embeddings a T5 encoder makes (not what only its decoder or output head would use).
_VAE_NOT_ARCHITECTURE = ("sample_height", "sample_width", "force_upcast")
_T5_ENCODER_ARCHITECTURE = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                            "relative_attention_num_buckets", "relative_attention_max_distance",
                            "layer_norm_epsilon", "feed_forward_proj")


def encoder_architectures(spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """The VAE's and the text encoder's architecture, comparable across presets, folders and Hub ids."""
    from diffusers import AutoencoderKLCogVideoX

    vae = {k: v for k, v in _with_defaults(AutoencoderKLCogVideoX, spec.vae_config).items()
           if k not in _VAE_NOT_ARCHITECTURE}
    text = {k: spec.text_encoder_config.get(k) for k in _T5_ENCODER_ARCHITECTURE}
    return {"vae": vae, "text encoder": text}


def save_transformer(transformer: Any, target: Path, dtype: Any, dropped_learned_positions: bool,
                     state_dict: dict[str, Any] | None = None) -> None:
    """A diffusers transformer folder (`from_pretrained` loads it) in `dtype`, written atomically.

    A model trained without its learned positional embeddings is saved without them (config and
    weights), so that diffusers loads it at any resolution. `state_dict`: the weights gathered on
    this process, when the transformer's own are sharded (FSDP, ZeRO-3).
    """
    from huggingface_hub import save_torch_state_dict

    from cogtune.fsutil import atomic_directory

    source = transformer.state_dict() if state_dict is None else state_dict
    state = {name: tensor.detach().to("cpu", dtype=dtype) for name, tensor in source.items()}
    if dropped_learned_positions:
        state.pop("patch_embed.pos_embedding", None)
    with atomic_directory(target, replace=True) as tmp:
        transformer.save_config(tmp)
        if dropped_learned_positions:
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["use_learned_positional_embeddings"] = False
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_torch_state_dict(state, tmp, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size="10GB")
