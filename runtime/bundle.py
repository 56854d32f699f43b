"""Load and validate an exported bundle (``manifest.json`` + ONNX graphs + arrays).

The contract (format version, model names, layout, hashing, the typed manifest) is
``runtime/bundle_format.py``. Validation here: the manifest's fields and types (on reading
it), that every graph and array is listed in the file table, the sha256 of every listed
file (a mismatch names the file), and array shapes against the manifest (voxel count,
sessions, decoder columns, latent and text shapes). Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainldm.runtime.bundle_format import (DECODER_KEYS, MANIFEST, BundleError, Generation, ImageModel, Manifest,
                                            file_sha256, read_manifest)

__all__ = ["Bundle", "BundleError", "file_sha256", "load_bundle", "read_manifest", "verify_files"]


@dataclass(frozen=True)
class Bundle:
    """A validated bundle.

    Attributes:
        root: bundle folder; manifest: its validated manifest.json.
        voxel_ids (V,) int64; sessions (S,) int64; mean, std (S, V) float32.
        columns: "z"/"c" -> (V_dec,) int64 columns into the betas layout.
        uncond (T, D) float32; alphas_cumprod (n_train,) float32.
    """

    root: Path
    manifest: Manifest
    voxel_ids: np.ndarray
    sessions: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    columns: dict[str, np.ndarray]
    uncond: np.ndarray
    alphas_cumprod: np.ndarray

    def model_path(self, name: str, fp16: bool = False) -> Path:
        """Path of the ONNX graph ``name`` (one of bundle_format.MODEL_NAMES)."""
        models = self.manifest.models
        if name not in models:
            raise BundleError(f"{self.root}: no model {name!r} in the manifest; it has {sorted(models)}")
        rel = models[name].fp16_file if fp16 else models[name].file
        if rel is None:
            raise BundleError(f"{self.root}: model {name!r} has no fp16 variant (export with export.fp16: true)")
        return self.root / rel

    @property
    def generation(self) -> Generation:
        return self.manifest.generation

    @property
    def image_model(self) -> ImageModel:
        return self.manifest.image_model


def verify_files(root: Path, manifest: Manifest) -> None:
    """Raise BundleError naming the first listed file that is missing or whose sha256 differs."""
    if not manifest.files:
        raise BundleError(f"{root / MANIFEST}: no 'files' table of sha256 hashes")
    for rel, expected in sorted(manifest.files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle {root}: file {rel} listed in the manifest is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(f"bundle {root}: sha256 mismatch for {rel} (manifest {expected[:12]}..., file "
                              f"{actual[:12]}...); the file was modified or corrupted, re-export the bundle")


def _check_models_listed(root: Path, manifest: Manifest) -> None:
    """Every graph the manifest names must be in its file table, so that verification covers it."""
    for name, model in sorted(manifest.models.items()):
        for rel in (model.file, model.fp16_file):
            if rel is not None and rel not in manifest.files:
                raise BundleError(f"bundle {root}: model {name!r} file {rel} is not listed (and hashed) "
                                  "in the manifest's file table")


def _array(root: Path, manifest: Manifest, rel: str, dtype) -> np.ndarray:
    if rel not in manifest.files:
        raise BundleError(f"bundle {root}: array {rel} is not listed (and hashed) in the manifest")
    return np.load(root / rel, allow_pickle=False).astype(dtype, copy=False)


def _check_shapes(root: Path, b: dict[str, np.ndarray], manifest: Manifest) -> None:
    n_voxels = manifest.input.n_voxels
    n_sessions = len(b["sessions"])
    expect = {"voxel_ids": (n_voxels,), "mean": (n_sessions, n_voxels), "std": (n_sessions, n_voxels),
              "uncond": manifest.image_model.text_shape}
    for key, shape in expect.items():
        if b[key].shape != shape:
            raise BundleError(f"bundle {root}: {key} has shape {b[key].shape}; the manifest implies {shape}")
    for key in DECODER_KEYS:
        cols, n_inputs = b["columns"][key], manifest.decoders[key].n_inputs
        if cols.shape != (n_inputs,) or (cols.size and (cols.min() < 0 or cols.max() >= n_voxels)):
            raise BundleError(f"bundle {root}: {key}-decoder columns have shape {cols.shape} / range outside "
                              f"[0, {n_voxels}); expected ({n_inputs},) columns into the betas layout")
    if not (np.all(b["std"] > 0) and np.isfinite(b["mean"]).all()):
        raise BundleError(f"bundle {root}: normalisation statistics hold non-finite means or std <= 0")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Load the bundle at ``root``; ``verify`` checks every file's sha256 (seconds for SD-sized graphs)."""
    root = Path(root)
    manifest = read_manifest(root)
    _check_models_listed(root, manifest)
    if verify:
        verify_files(root, manifest)
    norm = manifest.normalisation
    arrays = {
        "voxel_ids": _array(root, manifest, manifest.input.voxel_ids, np.int64),
        "sessions": _array(root, manifest, norm.sessions, np.int64),
        "mean": _array(root, manifest, norm.mean, np.float32),
        "std": _array(root, manifest, norm.std, np.float32),
        "columns": {k: _array(root, manifest, manifest.decoders[k].columns, np.int64) for k in DECODER_KEYS},
        "uncond": _array(root, manifest, manifest.uncond, np.float32),
        "alphas_cumprod": _array(root, manifest, manifest.scheduler.alphas_cumprod, np.float32),
    }
    _check_shapes(root, arrays, manifest)
    return Bundle(root=root, manifest=manifest, **arrays)
