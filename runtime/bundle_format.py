"""The bundle contract: what ``brainldm.export.export`` writes and ``brainldm.runtime`` reads.

One definition of the format version, the model names, the file layout, the file hash
and the manifest. The manifest is typed (frozen dataclasses, ``Manifest``): export builds
one and writes it with :func:`write_manifest`; the runtime reads it with
:func:`read_manifest`, where a missing, unknown or mistyped field is a ``BundleError``
naming the field and what was expected. Imports no torch (nor numpy).

Layout of a bundle folder::

    manifest.json
    models/<model>.onnx (+ .onnx.data > 2 GB)     every name of MODEL_NAMES
    models/<model>.fp16.onnx                      FP16_MODELS, with export.fp16 (fp16 inputs/outputs)
    arrays/<array>.npy                            every name of ARRAY_NAMES
    tensorrt/<trt version>_<gpu name>/<model>.plan  when tensorrt was importable at export
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODELS_DIR = "models"
ARRAYS_DIR = "arrays"
TENSORRT_DIR = "tensorrt"
MODEL_NAMES = ("z_decoder", "c_decoder", "unet", "vae_decoder", "vae_encoder")
FP16_MODELS = ("unet", "vae_decoder", "vae_encoder")  # the decoders are small: they stay fp32
DECODER_KEYS = ("z", "c")  # decoders["z"] runs model "z_decoder", decoders["c"] "c_decoder"
ARRAY_NAMES = ("voxel_ids", "norm_sessions", "norm_mean", "norm_std", "columns_z", "columns_c", "uncond",
               "alphas_cumprod")
HASH_CHUNK_BYTES = 1 << 20  # files are hashed in 1 MiB reads: SD-sized graphs never sit in memory whole
MANIFEST_INDENT = 2
OMIT_IF_NONE = {"omit_if_none": True}  # field metadata: the key is left out of the JSON (not null) when None
MAX_SHOWN_CHARS = 80  # of a mistyped value, in its error message


class BundleError(ValueError):
    """The bundle is missing, corrupted or of an unsupported format."""


def model_file(name: str, fp16: bool = False) -> str:
    """Bundle-relative path of the ONNX graph ``name`` (its fp16 variant with ``fp16``)."""
    return f"{MODELS_DIR}/{name}.fp16.onnx" if fp16 else f"{MODELS_DIR}/{name}.onnx"


def array_file(name: str) -> str:
    """Bundle-relative path of the array ``name`` (one of ARRAY_NAMES)."""
    return f"{ARRAYS_DIR}/{name}.npy"


def decoder_model(key: str) -> str:
    """The model name of the decoder of ``key`` ("z" -> "z_decoder")."""
    return f"{key}_decoder"


def engine_file(folder: str, name: str) -> str:
    """Bundle-relative path of the TensorRT engine of model ``name`` in ``folder`` (under TENSORRT_DIR)."""
    return f"{folder}/{name}.plan"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in HASH_CHUNK_BYTES chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the manifest: one frozen dataclass per JSON object; field names are the JSON keys ----

@dataclass(frozen=True)
class CreatedBy:
    module: str
    torch: str
    onnxruntime: str


@dataclass(frozen=True)
class InputLayout:
    """Raw betas (n, n_voxels) float32, columns in ``voxel_ids`` order; ``sessions`` 1-based ids."""

    layout: str
    voxel_ids: str
    n_voxels: int
    sessions: tuple[int, ...]


@dataclass(frozen=True)
class Normalisation:
    """Arrays (S,) sessions and (S, V) mean, std; ``formula`` states how they are applied."""

    sessions: str
    mean: str
    std: str
    formula: str


@dataclass(frozen=True)
class DecoderEntry:
    """One decoder: ``columns`` (n_inputs,) into the betas layout -> prediction of ``target_shape``."""

    name: str
    kind: str
    model: str
    input_rois: tuple[str, ...]
    columns: str
    n_inputs: int
    target_shape: tuple[int, ...]


@dataclass(frozen=True)
class RoiGraph:
    """The ROI graph of the prepared file: edge_index (2, E), edge_weight (E,), node ROIs."""

    edge_index: tuple[tuple[int, ...], ...]
    edge_weight: tuple[float, ...]
    node_rois: tuple[tuple[str, ...], ...]
    pad_length: int


@dataclass(frozen=True)
class ImageModel:
    """The image model: latents (C, h, w) = latent_shape at ``resolution`` px; text states text_shape (T, D)."""

    source: str
    latent_shape: tuple[int, ...]
    scaling_factor: float
    vae_scale_factor: int
    resolution: int
    native_resolution: int
    text_shape: tuple[int, ...]


@dataclass(frozen=True)
class Scheduler:
    """diffusers' DDIM scheduler config, and its alphas_cumprod (n_train,) array."""

    config: dict[str, Any]
    alphas_cumprod: str


@dataclass(frozen=True)
class Generation:
    """The reference reconstruction's settings (params section ``reconstruct``)."""

    steps: int
    strength: float
    guidance: float
    samples: int
    seed: int
    encode_mode: str


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output; symbolic axes are strings, unknown ones None."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class ModelEntry:
    file: str
    dtype: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    fp16_file: str | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class TensorRTEngines:
    """Engines built for one TensorRT version and GPU; profiles: model -> [min, opt, max] batch."""

    folder: str
    trt_version: str
    gpu: str
    precision: str
    engines: dict[str, str]
    profiles: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``. Paths are relative to the bundle folder; ``files`` maps each to its sha256."""

    format_version: int
    created_by: CreatedBy
    dataset: str
    subject: str
    source: str
    pair: str
    input: InputLayout
    normalisation: Normalisation
    decoders: dict[str, DecoderEntry]
    graph: RoiGraph | None
    image_model: ImageModel
    scheduler: Scheduler
    generation: Generation
    uncond: str
    models: dict[str, ModelEntry]
    tensorrt: TensorRTEngines | None
    files: dict[str, str]
    config: dict[str, Any]


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts (OMIT_IF_NONE fields left out when None), tuples -> lists, recursively."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def manifest_json(manifest: Manifest) -> str:
    """The manifest's JSON text: sorted keys, indent 2, no trailing newline (the committed bundles' bytes)."""
    return json.dumps(to_plain(manifest), indent=MANIFEST_INDENT, sort_keys=True)


# ---- reading: plain JSON data -> Manifest, every field checked ----

_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected(tp: Any) -> str:
    """What a value of type ``tp`` looks like in JSON, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return f"an object with the fields {[f.name for f in dataclasses.fields(tp)]}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if origin is tuple:
        return f"a list of {_expected(args[0])}"
    if origin is dict:
        return f"an object of {_expected(args[1])}"
    return _EXPECTED.get(tp, "any JSON value")


def _mistyped(tp: Any, value: Any, where: str) -> BundleError:
    shown = repr(value)
    shown = shown if len(shown) <= MAX_SHOWN_CHARS else shown[:MAX_SHOWN_CHARS] + "..."
    return BundleError(f"manifest field '{where}' is {shown}; expected {_expected(tp)}")


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the outer JSON kind of ``tp`` (its parts are checked as they are parsed).
    JSON has no int/float distinction for whole numbers, but true/false are never numbers."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, list)
    if tp in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if tp is float else tp)


def _parse(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``; BundleError naming ``where`` when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        option = next((a for a in args if a is not type(None) and _fits(a, value)), None)
        if option is None:
            raise _mistyped(tp, value, where)
        return _parse(option, value, where)
    if not _fits(tp, value):
        raise _mistyped(tp, value, where)
    if dataclasses.is_dataclass(tp):
        return _parse_object(tp, value, where)
    if origin is tuple:
        return tuple(_parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        return {k: _parse(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return float(value) if tp is float else value


def _parse_object(cls: type, value: dict, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise BundleError(f"manifest field '{prefix}{unknown[0]}' is not part of bundle format_version "
                          f"{FORMAT_VERSION}; expected only the fields {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _parse(hints[name], value[name], prefix + name)
        elif not f.metadata.get("omit_if_none"):
            raise BundleError(f"manifest field '{prefix}{name}' is missing; expected {_expected(hints[name])}")
    return cls(**kwargs)


def parse_manifest(data: Any) -> Manifest:
    """Parsed ``manifest.json`` data -> Manifest: format version, every field's type, and the
    contract's names (every model of MODEL_NAMES, a decoder per DECODER_KEYS) checked."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format_version {version!r} is not supported; this runtime reads "
                          f"format_version {FORMAT_VERSION} (re-export the bundle or use a matching runtime)")
    manifest = _parse(Manifest, data, "")
    missing = [n for n in MODEL_NAMES if n not in manifest.models]
    if missing or sorted(manifest.decoders) != sorted(DECODER_KEYS):
        raise BundleError(f"manifest lists the models {sorted(manifest.models)} and decoders "
                          f"{sorted(manifest.decoders)}; expected the models {list(MODEL_NAMES)} and decoders "
                          f"{list(DECODER_KEYS)}")
    return manifest


def read_manifest(root: Path) -> Manifest:
    """The validated manifest of the bundle folder ``root`` (BundleError naming the file and the fault)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root} (create one with `python -m brainldm.export.export`)")
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid UTF-8 JSON ({exc})") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        return parse_manifest(data)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``root/manifest.json``, after checking that the runtime's reader accepts it."""
    text = manifest_json(manifest)
    parse_manifest(json.loads(text))
    path = Path(root) / MANIFEST
    path.write_text(text, encoding="utf-8")
    return path
