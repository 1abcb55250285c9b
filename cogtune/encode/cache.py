"""The latent cache: what `cogtune encode` writes and `cogtune train` reads.

Layout of a cache folder::

    manifest.json               plain JSON: what made the cache and the list of items
    config.toml                 the encode run's resolved settings
    latents/000000.safetensors  `latent_dist` (2C, F, H, W): the VAE posterior's mean and logvar,
                                as diffusers' DiagonalGaussianDistribution keeps them, so that
                                training samples a fresh latent every time; I2V adds
                                `image_latent_dist` (2C, 1, H, W) of the condition image
    text/000000.safetensors     `prompt_embeds` (L, D): T5 embeddings padded to the model's length
    text/empty.safetensors      the empty caption's embeddings (caption dropout, guidance)
    text/validation.safetensors the validation prompts' embeddings

Every file is written atomically and carries, in its safetensors metadata, the key of what it was
made from; a re-run skips files whose key still matches, so an interrupted encode resumes.
Latents are stored unscaled: the model's scaling factor is applied at train time.

Integrity: each file's header also records `tensor_sha256`, a digest of its tensors (names, dtypes,
shapes and bytes), computed from the tensors as they are written. The manifest copies it, with the
file's size and its tensors' dtypes and shapes, into `integrity` (per item, keyed by file). The
reader checks the manifest's structure and paths when it opens a cache, and each file the first
time this process loads it: size, tensor names, dtypes and shapes (against the record and against
the item's bucket), that the values are finite (and latents not all zero), and the digest. The
digest is of the tensors already in memory, so verification reads nothing twice: about 40 ms per
32 MB on one CPU core, once per file per run (a 5b step takes seconds). Caches written before the
digests existed still load, with every check but the digest.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cogtune.data.clips import Bucket
from cogtune.errors import DataError
from cogtune.fsutil import atomic_path, unreadable_reason
from cogtune.models.registry import ModelSpec

CACHE_FORMAT = "cogtune-latent-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_FILE = "text/empty.safetensors"
VALIDATION_PROMPTS_FILE = "text/validation.safetensors"
DIGEST_KEY = "tensor_sha256"  # safetensors metadata: the digest of the file's tensors
INTEGRITY_KEY = "integrity"  # manifest (per item and top level): {relative file: file_record(...)}
_REENCODE_HINT = "delete the file and re-run `cogtune encode` to encode it again; --overwrite re-encodes the whole cache"


def latent_file(index: int) -> str:
    return f"latents/{index:06d}.safetensors"


def text_file(index: int) -> str:
    return f"text/{index:06d}.safetensors"


def stable_hash(data: Any) -> str:
    payload = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def compatibility(spec: ModelSpec) -> dict[str, Any]:
    """What a model must share with the one that made a cache for the cache to be valid for it.

    Latents are stored unscaled, so two models whose VAEs agree in architecture, scaling factor and
    latent convention (5b and 5b-I2V, or a fine-tune and its base) can share a cache; the text side
    must agree in encoder architecture, length and width.
    """
    vae = {k: v for k, v in spec.vae_config.items() if k not in ("sample_height", "sample_width", "force_upcast")}
    return {
        "version": spec.version,
        "latent_channels": spec.latent_channels,
        "spatial_compression": spec.spatial_compression,
        "temporal_compression": spec.temporal_compression,
        "scaling_factor": spec.scaling_factor,
        "invert_scale_latents": spec.invert_scale_latents,
        "vae_architecture": stable_hash(vae),
        "text_encoder_architecture": stable_hash(dict(spec.text_encoder_config)),
        "max_text_tokens": spec.max_text_tokens,
        "text_embed_dim": spec.text_embed_dim,
    }


def tensor_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 of tensors' names, dtypes, shapes and bytes (the same before saving and after loading)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, _dtype_name(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# safetensors' header dtype names -> torch's
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest records of a cache file: size, digest, and each tensor's dtype and shape.

    Reads only the header when the file carries its digest (every file this cogtune writes);
    a file written before digests existed is loaded once to compute it.
    """
    with safe_open(str(path), framework="pt") as handle:
        digest = (handle.metadata() or {}).get(DIGEST_KEY)
        tensors = {}
        for name in sorted(handle.keys()):
            piece = handle.get_slice(name)
            dtype = piece.get_dtype()
            tensors[name] = {"dtype": _SAFETENSORS_DTYPES.get(dtype, dtype.lower()), "shape": list(piece.get_shape())}
    if digest is None:
        digest = tensor_digest(load_file(str(path)))
    return {"bytes": path.stat().st_size, "sha256": digest, "tensors": tensors}


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Save tensors atomically with string metadata (JSON-encoded values) and their digest."""
    from safetensors.torch import save_file  # looked up per call: tests fill the disk by patching it

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    meta.setdefault(DIGEST_KEY, tensor_digest(tensors))
    with atomic_path(path, sweep=False) as tmp:  # `encode` sweeps the cache once, under its lock
        save_file(tensors, str(tmp), metadata=meta)


def value_problem(tensors: Mapping[str, Any]) -> str | None:
    """What makes a cache file's values unfit to train on (NaN, inf, all-zero latents), or None."""
    for name in sorted(tensors):
        tensor = tensors[name]
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        # One pass: the L1 norm is NaN or inf when any value is, and 0 only when all are. A VAE
        # posterior is never all zeros; an embedding may be (synthetic caches use zero ones).
        total = float(torch.linalg.vector_norm(tensor, ord=1, dtype=torch.float32))
        if total == 0.0 and "latent" in name:
            return f"holds {name} of all zeros"
        if total != total or total in (float("inf"), float("-inf")):
            if not bool(torch.isfinite(tensor).all()):
                return f"holds {int((~torch.isfinite(tensor)).sum())} non-finite values (NaN or inf) in {name}"
            return f"holds values in {name} too large to train on"
    return None


def finished_file_problem(path: Path) -> str | None:
    """Why a cache file that a re-run would keep (its key matches) cannot be kept, or None.

    Its tensors must load, match the digest its header recorded when it was written, and hold
    values fit to train on: a re-run verifies what it skips, so "cache ready" means it.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            digest = (handle.metadata() or {}).get(DIGEST_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors' own errors for a damaged file
        return f"cannot be read ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]})"
    if digest is not None and tensor_digest(tensors) != digest:
        return "does not match the digest written with it (corrupt or replaced)"
    return value_problem(tensors)


def read_metadata(path: Path) -> dict[str, str] | None:
    """A safetensors file's metadata, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:
        return None


class VideoLatentCache:
    """Read access to a finished cache folder (manifest plus safetensors files).

    The manifest's structure and item paths are checked on opening; each file is verified the first
    time this object loads it (see the module's docstring). Errors name the manifest or the file.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        self.manifest_path = manifest_path
        if not manifest_path.is_file():
            if self.root.is_dir() and any(self.root.glob("latents/*.safetensors")):
                raise DataError(f"cache {self.root} is incomplete (no manifest.json): re-run `cogtune encode` to finish it")
            raise DataError(f"{self.root} is not a cogtune cache (no manifest.json); create one with `cogtune encode`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict):
            raise DataError(f"{manifest_path} is not a cogtune cache manifest ({_json_kind(manifest)} at the top "
                            "level, not an object)")
        self.manifest: dict[str, Any] = manifest
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DataError(f"{manifest_path} is not a cogtune cache manifest")
        if self.manifest.get("format_version") != CACHE_VERSION:
            raise DataError(
                f"{self.root} uses cache format {self.manifest.get('format_version')}, this cogtune reads "
                f"{CACHE_VERSION}; re-encode with `cogtune encode --overwrite`"
            )
        if not self.manifest.get("complete"):
            raise DataError(f"cache {self.root} is incomplete: re-run `cogtune encode` to finish it")
        self._check_structure()
        self.items: list[dict[str, Any]] = list(self.manifest["items"])
        if not self.items:
            raise DataError(f"cache {self.root} holds no items")
        self._real_root = self.root.resolve()
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    # --- structure ---------------------------------------------------------------------------------

    def _damaged(self, problem: str) -> DataError:
        return DataError(f"{self.manifest_path}: {problem}",
                         hint="the manifest is damaged: re-run `cogtune encode` (same options) to rewrite it")

    def _check_structure(self) -> None:
        """Every field the reader relies on has the right type; item paths stay inside the cache."""
        manifest = self.manifest
        for key, kind, required in (("items", list, True), ("buckets", list, True), ("compatibility", dict, False),
                                    ("vae", dict, False), ("text", dict, False), ("model", dict, False),
                                    ("validation_prompts", list, False), (INTEGRITY_KEY, dict, False),
                                    ("image_augmentation", dict, False)):
            value = manifest.get(key)
            if value is None and not required:
                continue
            if not isinstance(value, kind):
                found = "missing" if key not in manifest else _json_kind(value)
                raise self._damaged(f"'{key}' must be {_json_kind(kind())}, found {found}")
        buckets = manifest["buckets"]
        for bucket in buckets:
            if _parse_bucket(bucket) is None:
                raise self._damaged(f"bucket {bucket!r} is not FxHxW")
        if not all(isinstance(p, str) for p in manifest.get("validation_prompts") or []):
            raise self._damaged("'validation_prompts' must be a list of strings")
        for position, item in enumerate(manifest["items"]):
            where = f"item {position}"
            if not isinstance(item, dict):
                raise self._damaged(f"{where} is {_json_kind(item)}, not an object")
            for key in ("latent_file", "text_file"):
                self._check_relative(item.get(key), f"{where}'s {key}")
            if item.get("bucket") not in buckets:
                raise self._damaged(f"{where}'s bucket {item.get('bucket')!r} is not one of the cache's buckets "
                                    f"({', '.join(map(str, buckets))})")
            if not isinstance(item.get(INTEGRITY_KEY, {}), dict):
                raise self._damaged(f"{where}'s '{INTEGRITY_KEY}' must be a JSON object")
            repeats = item.get("repeats", 1)
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
                raise self._damaged(f"{where}'s 'repeats' must be a whole number >= 1, found {repeats!r}")

    def _check_relative(self, relative: Any, what: str) -> None:
        if not isinstance(relative, str) or not relative:
            raise self._damaged(f"{what} is missing or not a string")
        if (PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute()
                or PureWindowsPath(relative).drive or ".." in PurePosixPath(relative.replace("\\", "/")).parts):
            raise DataError(f"{self.manifest_path}: {what} '{relative}' leads outside the cache folder {self.root}; "
                            "refusing to read it", hint="cache files must be relative paths inside the cache folder")

    # --- facts -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.items)

    @property
    def buckets(self) -> list[str]:
        return list(self.manifest["buckets"])

    @property
    def item_buckets(self) -> list[str]:
        """Each item's bucket, in item order."""
        return [item["bucket"] for item in self.items]

    @property
    def item_repeats(self) -> list[int]:
        """Each item's weight in the training schedule (its dataset's `repeats`; 1 when not recorded)."""
        return [int(item.get("repeats", 1)) for item in self.items]

    @property
    def has_image_latents(self) -> bool:
        return bool(self.manifest.get("i2v"))

    @property
    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """(frames, height, width) of each bucket, in the manifest's order."""
        from cogtune.data.clips import Bucket

        return [Bucket.parse(bucket).shape for bucket in self.buckets]

    @property
    def validation_prompts(self) -> list[str]:
        return list(self.manifest.get("validation_prompts", []))

    def describe_item(self, index: int) -> str:
        """`latents/000002.safetensors (videos/clip_002.mp4, videos.txt:3)`: the item's file and its source."""
        origin = self._origin(index)
        return f"{self.items[index]['latent_file']} ({origin})" if origin else str(self.items[index]["latent_file"])

    def _origin(self, index: int) -> str:
        """`videos/clip_002.mp4, videos.txt:3`: the clip and the dataset line an item was made from."""
        item = self.items[index]
        origin = []
        if item.get("video"):
            origin.append(str(item["video"]))
        if item.get("source"):
            source = Path(str(item["source"])).name
            origin.append(f"{source}:{item['line']}" if item.get("line") is not None else source)
        return ", ".join(origin)

    # --- loading and verification ------------------------------------------------------------------

    def _load(self, relative: str, index: int | None = None) -> dict[str, Any]:
        self._check_relative(relative, "cache file" if index is None else f"item {index}'s file")
        path = self.root / relative
        first = relative not in self._verified
        record = self._record(relative, index) if first else None
        if first:
            resolved = path.resolve()
            if resolved != self._real_root and self._real_root not in resolved.parents:
                raise DataError(f"{self.manifest_path}: {relative} leads outside the cache folder {self.root} "
                                f"(through a symbolic link, to {resolved}); refusing to read it",
                                hint="cache files must be inside the cache folder")
            if record and isinstance(record.get("bytes"), int) and path.is_file():
                size = path.stat().st_size
                if size != record["bytes"]:
                    raise self._bad_file(path, index, f"is {size} bytes, the manifest recorded {record['bytes']}")
        try:
            tensors = load_file(str(path))
        except FileNotFoundError as exc:
            if path.exists():  # safetensors says "No such file" of a file it may not open
                raise DataError(f"cache file {path} cannot be read: {unreadable_reason(path)}",
                                hint="check its permissions (ls -l); cogtune only reads the cache") from exc
            raise DataError(f"cache file {path} is missing; re-run `cogtune encode` on this cache") from exc
        except Exception as exc:
            raise DataError(f"cache file {path} is unreadable ({exc}); re-run `cogtune encode --overwrite`") from exc
        if first:
            self._verify(path, relative, tensors, record, index)
            with self._lock:
                self._verified.add(relative)
        return tensors

    def _record(self, relative: str, index: int | None) -> dict[str, Any] | None:
        owner = self.manifest if index is None else self.items[index]
        records = owner.get(INTEGRITY_KEY) or {}
        record = records.get(relative)
        return record if isinstance(record, dict) else None

    def _bad_file(self, path: Path, index: int | None, problem: str) -> DataError:
        origin = f" (item {index}: {self._origin(index) or 'no source recorded'})" if index is not None else ""
        return DataError(f"cache file {path}{origin} {problem}", hint=_REENCODE_HINT)

    def expected_shapes(self, relative: str, index: int | None) -> dict[str, tuple[int, ...]]:
        """Shapes the manifest's facts imply for a file's known tensors (what is unknown is left out)."""
        manifest = self.manifest
        vae = manifest.get("vae") or {}
        compat = manifest.get("compatibility") or {}
        text = manifest.get("text") or {}
        channels = vae.get("latent_channels", compat.get("latent_channels"))
        spatial = vae.get("spatial_compression", compat.get("spatial_compression"))
        temporal = vae.get("temporal_compression", compat.get("temporal_compression"))
        tokens, width = text.get("max_tokens", compat.get("max_text_tokens")), text.get("embed_dim",
                                                                                         compat.get("text_embed_dim"))
        shapes: dict[str, tuple[int, ...]] = {}
        if index is not None and relative == self.items[index]["latent_file"]:
            bucket = _parse_bucket(self.items[index]["bucket"])
            if bucket and all(isinstance(v, int) and v > 0 for v in (channels, spatial, temporal)):
                h, w = bucket.height // spatial, bucket.width // spatial
                shapes["latent_dist"] = (2 * channels, (bucket.frames - 1) // temporal + 1, h, w)
                if self.has_image_latents:
                    shapes["image_latent_dist"] = (2 * channels, 1, h, w)
                    samples = (manifest.get("image_augmentation") or {}).get("noised_samples")
                    if isinstance(samples, int) and samples > 0:
                        shapes["image_latent_dist_noised"] = (samples, 2 * channels, 1, h, w)
                        shapes["image_noise_sigma"] = (samples,)
        elif all(isinstance(v, int) and v > 0 for v in (tokens, width)):
            if index is not None or relative == EMPTY_PROMPT_FILE:
                shapes["prompt_embeds"] = (tokens, width)
            elif relative == VALIDATION_PROMPTS_FILE:
                shapes["prompt_embeds"] = (len(self.validation_prompts), tokens, width)
        return shapes

    def _verify(self, path: Path, relative: str, tensors: dict[str, Any], record: dict[str, Any] | None,
                index: int | None) -> None:
        """Names, dtypes and shapes; finite, not all-zero values; the digest when the manifest has one."""
        expected = self.expected_shapes(relative, index)
        recorded = (record or {}).get("tensors") if isinstance((record or {}).get("tensors"), dict) else {}
        required = set(expected) | set(recorded)
        if index is not None and relative == self.items[index]["latent_file"]:
            required.add("latent_dist")
            if self.has_image_latents:
                required.add("image_latent_dist")
        else:
            required.add("prompt_embeds")
        missing = sorted(required - set(tensors))
        if missing:
            raise self._bad_file(path, index, f"lacks the tensor {missing[0]}")
        for name, tensor in tensors.items():
            shape = tuple(tensor.shape)
            want = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
            if "shape" in want and list(shape) != list(want["shape"]):
                raise self._bad_file(path, index, f"holds {name} of shape {_shape(shape)}; the manifest recorded "
                                                  f"{_shape(want['shape'])}")
            if "dtype" in want and _dtype_name(tensor.dtype) != want["dtype"]:
                raise self._bad_file(path, index, f"holds {name} as {_dtype_name(tensor.dtype)}; the manifest "
                                                  f"recorded {want['dtype']}")
            if name in expected and shape != expected[name]:
                bucket = f"bucket {self.items[index]['bucket']}" if index is not None and "latent" in name \
                    else "text settings"
                raise self._bad_file(path, index, f"holds {name} of shape {_shape(shape)}; the manifest's {bucket} "
                                                  f"needs {_shape(expected[name])}")
        problem = value_problem(tensors)
        if problem:
            raise self._bad_file(path, index, problem)
        digest = (record or {}).get("sha256")
        if isinstance(digest, str) and tensor_digest(tensors) != digest:
            raise self._bad_file(path, index, "does not match the digest the manifest recorded (it changed after "
                                              "encoding: corrupt or replaced)")

    def load_item(self, index: int) -> dict[str, Any]:
        """Tensors of item `index`: latent_dist, prompt_embeds, and image_latent_dist for I2V caches."""
        item = self.items[index]
        tensors = self._load(item["latent_file"], index)
        tensors.update(self._load(item["text_file"], index))
        return tensors

    def empty_prompt_embeds(self):
        return self._load(EMPTY_PROMPT_FILE)["prompt_embeds"]

    def validation_prompt_embeds(self):
        if not self.validation_prompts:
            return None
        return self._load(VALIDATION_PROMPTS_FILE)["prompt_embeds"]

    def check_compatible(self, spec: ModelSpec, needs_image_latents: bool = False) -> None:
        """Refuse, with the differing facts named, a cache made for an incompatible model."""
        made_for = self.manifest.get("compatibility", {})
        wanted = compatibility(spec)
        different = [key for key in wanted if made_for.get(key) != wanted[key]]
        model = self.manifest.get("model", {})
        architectures = [key for key in different if key in ("vae_architecture", "text_encoder_architecture")]
        words: list[str] | None = None
        if architectures:
            # The hashes differ, yet the models may be one (a preset and a folder saved from it list
            # their configs differently): compare the architectures themselves, in words.
            words = _architecture_differences(model.get("reference"), spec)
            if words == []:
                different = [key for key in different if key not in architectures]
        if different:
            details = [f"{key} {made_for.get(key)!r} vs {wanted[key]!r}" for key in different if key not in architectures]
            words = [w for w in words or [] if not any(w.startswith(f"vae {key} ") for key in different)]
            details += words or [key.replace("_", " ") + " differs" for key in architectures]
            details = ", ".join(details[:4])
            raise DataError(
                f"cache {self.root} was made for {model.get('name', 'another model')}, which is incompatible "
                f"with {spec.name} ({details})",
                hint="encode the dataset again for this model with `cogtune encode`",
            )
        if needs_image_latents and not self.has_image_latents:
            raise DataError(
                f"cache {self.root} has no condition-image latents, which image-to-video training needs",
                hint="encode it with `cogtune encode --i2v` (or for an I2V model)",
            )


def _architecture_differences(reference: Any, spec: ModelSpec) -> list[str] | None:
    """How the cache's model's VAE and text encoder differ from `spec`'s, in words ([] : they do not);
    None when the cache's model cannot be read (configs only, nothing downloaded)."""
    from cogtune.errors import CogtuneError
    from cogtune.models.loading import encoder_architectures, resolve_model

    if not reference:
        return None
    try:
        theirs = encoder_architectures(resolve_model(str(reference)).spec)
    except (CogtuneError, OSError):
        return None
    ours = encoder_architectures(spec)
    return [f"{part} {key} {theirs[part].get(key)!r} vs {ours[part].get(key)!r}"
            for part in ours for key in sorted(set(ours[part]) | set(theirs[part]))
            if theirs[part].get(key) != ours[part].get(key)]


def _json_kind(value: Any) -> str:
    """`an object`, `an array`, `a string`, ...: what a JSON value is, with its article."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _parse_bucket(text: Any) -> Bucket | None:
    """The bucket a manifest names, or None when the value is not one."""
    if not isinstance(text, str):
        return None
    try:
        return Bucket.parse(text)
    except DataError:
        return None


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(v) for v in shape) + ")"
