"""Load and validate an exported bundle (``manifest.json`` + ONNX graphs + arrays).

Validation: the format version, the sha256 of every file the manifest lists (a
mismatch names the file), array shapes against the manifest (voxel count, sessions,
decoder columns, latent and text shapes). Imports no torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK_BYTES = 1 << 20
DECODER_KEYS = ("z", "c")


class BundleError(ValueError):
    """The bundle is missing, corrupted or of an unsupported format."""


@dataclass(frozen=True)
class Bundle:
    """A validated bundle.

    Attributes:
        root: bundle folder; manifest: the parsed manifest.json.
        voxel_ids (V,) int64; sessions (S,) int64; mean, std (S, V) float32.
        columns: "z"/"c" -> (V_dec,) int64 columns into the betas layout.
        uncond (T, D) float32; alphas_cumprod (n_train,) float32.
    """

    root: Path
    manifest: dict[str, Any]
    voxel_ids: np.ndarray
    sessions: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    columns: dict[str, np.ndarray]
    uncond: np.ndarray
    alphas_cumprod: np.ndarray

    def model_path(self, name: str, fp16: bool = False) -> Path:
        """Path of the ONNX graph ``name`` (z_decoder, c_decoder, unet, vae_decoder, vae_encoder)."""
        models = self.manifest["models"]
        if name not in models:
            raise BundleError(f"{self.root}: no model {name!r} in the manifest; it has {sorted(models)}")
        key = "fp16_file" if fp16 else "file"
        if key not in models[name]:
            raise BundleError(f"{self.root}: model {name!r} has no fp16 variant (export with export.fp16: true)")
        return self.root / models[name][key]

    @property
    def generation(self) -> dict[str, Any]:
        return self.manifest["generation"]

    @property
    def image_model(self) -> dict[str, Any]:
        return self.manifest["image_model"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of ``root``, its format version checked."""
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root} (create one with `python -m brainldm.export.export`)")
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    version = manifest.get("format_version")
    if version != SUPPORTED_FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format_version {version!r} is not supported; this runtime reads "
                          f"format_version {SUPPORTED_FORMAT_VERSION} (re-export the bundle or use a matching runtime)")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Raise BundleError naming the first listed file that is missing or whose sha256 differs."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{root / MANIFEST}: no 'files' table of sha256 hashes")
    for rel, expected in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle {root}: file {rel} listed in the manifest is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(f"bundle {root}: sha256 mismatch for {rel} (manifest {expected[:12]}..., file "
                              f"{actual[:12]}...); the file was modified or corrupted, re-export the bundle")


def _check_models_listed(root: Path, manifest: dict[str, Any]) -> None:
    """Every graph the manifest names must be in its file table, so that verification covers it."""
    files = manifest.get("files") or {}
    for name, model in sorted(manifest["models"].items()):
        for key in ("file", "fp16_file"):
            if key in model and model[key] not in files:
                raise BundleError(f"bundle {root}: model {name!r} file {model[key]} is not listed (and hashed) "
                                  "in the manifest's file table")


def _array(root: Path, manifest: dict[str, Any], rel: str, dtype) -> np.ndarray:
    if rel not in manifest["files"]:
        raise BundleError(f"bundle {root}: array {rel} is not listed (and hashed) in the manifest")
    return np.load(root / rel, allow_pickle=False).astype(dtype, copy=False)


def _check_shapes(root: Path, b: dict[str, Any], manifest: dict[str, Any]) -> None:
    n_voxels = int(manifest["input"]["n_voxels"])
    expect = {"voxel_ids": (n_voxels,), "mean": (len(b["sessions"]), n_voxels), "std": (len(b["sessions"]), n_voxels),
              "uncond": tuple(manifest["image_model"]["text_shape"])}
    for key, shape in expect.items():
        if b[key].shape != shape:
            raise BundleError(f"bundle {root}: {key} has shape {b[key].shape}; the manifest implies {shape}")
    for key in DECODER_KEYS:
        cols, spec = b["columns"][key], manifest["decoders"][key]
        if cols.shape != (int(spec["n_inputs"]),) or (cols.size and (cols.min() < 0 or cols.max() >= n_voxels)):
            raise BundleError(f"bundle {root}: {key}-decoder columns have shape {cols.shape} / range outside "
                              f"[0, {n_voxels}); expected ({spec['n_inputs']},) columns into the betas layout")
    if not (np.all(b["std"] > 0) and np.isfinite(b["mean"]).all()):
        raise BundleError(f"bundle {root}: normalisation statistics hold non-finite means or std <= 0")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load the bundle at ``root``; ``verify`` checks every file's sha256 (seconds for SD-sized graphs)."""
    root = Path(root)
    manifest = read_manifest(root)
    _check_models_listed(root, manifest)
    if verify:
        verify_files(root, manifest)
    norm = manifest["normalisation"]
    arrays = {
        "voxel_ids": _array(root, manifest, manifest["input"]["voxel_ids"], np.int64),
        "sessions": _array(root, manifest, norm["sessions"], np.int64),
        "mean": _array(root, manifest, norm["mean"], np.float32),
        "std": _array(root, manifest, norm["std"], np.float32),
        "columns": {k: _array(root, manifest, manifest["decoders"][k]["columns"], np.int64) for k in DECODER_KEYS},
        "uncond": _array(root, manifest, manifest["uncond"], np.float32),
        "alphas_cumprod": _array(root, manifest, manifest["scheduler"]["alphas_cumprod"], np.float32),
    }
    _check_shapes(root, arrays, manifest)
    return Bundle(root=root, manifest=manifest, **arrays)
