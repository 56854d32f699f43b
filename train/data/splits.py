"""Reading the prepared file's splits and the targets file's rows: one definition for every stage.

``fit`` and ``decode`` read a split's voxels and its images' targets; ``reconstruct`` reads
the test images' true targets for the ceiling pair. The layouts are docs/prepared_schema.md
and the targets stage's (z (N, C, h, w), c (N, T, D), one row per prepared image).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

SPLITS = ("train", "val", "test")
TARGET_KINDS = ("z", "c")


def _checked(prepared: str | Path, split: str) -> Path:
    prepared = Path(prepared)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")
    if not prepared.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {prepared} (run the prepare stage first)")
    return prepared


def split_image_index(prepared: str | Path, split: str) -> np.ndarray:
    """Rows into the prepared file's ``images`` of one split's samples: (n,) int64."""
    prepared = _checked(prepared, split)
    with h5py.File(prepared, "r") as f:
        if f"splits/{split}/image_index" not in f:
            raise ValueError(f"{prepared}: no 'splits/{split}/image_index' (docs/prepared_schema.md)")
        return np.asarray(f[f"splits/{split}/image_index"], dtype=np.int64)


def load_inputs(prepared: str | Path, split: str, rois: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Voxels of ``rois`` concatenated in that order for one split.

    Returns ``x (n, V) float32`` (z-scored), ``image_index (n,) int64`` (rows of
    ``images``) and the voxel count of each ROI. Raises on a missing file, unknown
    split or ROI, or non-finite values.
    """
    prepared = _checked(prepared, split)
    with h5py.File(prepared, "r") as f:
        group = f[f"splits/{split}"]
        available = sorted(group["rois"].keys())
        unknown = [r for r in rois if r not in available]
        if unknown or not rois:
            raise ValueError(f"{prepared}: unknown input ROI(s) {unknown or list(rois)} for split {split}; "
                             f"available: {available}")
        blocks = [np.asarray(group[f"rois/{r}"], dtype=np.float32) for r in rois]
        image_index = np.asarray(group["image_index"], dtype=np.int64)
    for roi, block in zip(rois, blocks):
        if block.ndim != 2 or block.shape[0] != len(image_index):
            raise ValueError(f"{prepared}: splits/{split}/rois/{roi} has shape {block.shape}, "
                             f"expected ({len(image_index)}, V_roi)")
        if not np.isfinite(block).all():
            raise ValueError(f"{prepared}: splits/{split}/rois/{roi} contains NaN/inf "
                             f"({int((~np.isfinite(block)).sum())} values); expected finite z-scores")
    return np.concatenate(blocks, axis=1), image_index, [b.shape[1] for b in blocks]


def check_aligned(prepared: str | Path, targets: str | Path, target: str) -> None:
    """Raise unless the targets file has one ``target`` row per image of the prepared file."""
    with h5py.File(prepared, "r") as p, h5py.File(targets, "r") as t:
        n_images = p["images"].shape[0]
        if target in t and t[target].shape[0] != n_images:
            raise ValueError(f"{targets}: {target} has {t[target].shape[0]} rows but {prepared} has {n_images} "
                             "images; target rows must align with the prepared file's images (rerun targets)")


def load_targets(targets: str | Path, target: str, image_index: np.ndarray) -> np.ndarray:
    """Target rows for ``image_index``: ``z (n, C, h, w)`` or ``c (n, T, D)`` float32."""
    if target not in TARGET_KINDS:
        raise ValueError(f"target {target!r} unknown; expected one of {TARGET_KINDS}")
    return _target_rows(Path(targets), target, target, image_index)


def load_perfect_predictions(targets: str | Path, target: str, image_index: np.ndarray) -> np.ndarray:
    """The best prediction of ``target`` that any decoder of the image can make, rows for ``image_index``.

    z: the VAE posterior mean (``z_mean``; equal to z when ``targets.latent: mean``, else the
    sample's expectation: the posterior noise is not in the image). c: c itself (deterministic).
    Shapes as :func:`load_targets`.
    """
    if target not in TARGET_KINDS:
        raise ValueError(f"target {target!r} unknown; expected one of {TARGET_KINDS}")
    return _target_rows(Path(targets), target, "z_mean" if target == "z" else target, image_index)


def _target_rows(targets: Path, target: str, name: str, image_index: np.ndarray) -> np.ndarray:
    if not targets.is_file():
        raise FileNotFoundError(f"targets file not found: {targets} (run the targets stage first)")
    with h5py.File(targets, "r") as f:
        if name not in f:
            raise ValueError(f"{targets}: no dataset {name!r}; found {sorted(f.keys())} (rerun the targets stage)")
        ds = f[name]
        expected_ndim = 4 if target == "z" else 3
        if ds.ndim != expected_ndim:
            raise ValueError(f"{targets}: {name} has shape {ds.shape}; expected "
                             f"{'(N, C, h, w)' if target == 'z' else '(N, T, D)'}")
        if len(image_index) and (image_index.min() < 0 or image_index.max() >= ds.shape[0]):
            raise ValueError(f"{targets}: {name} has {ds.shape[0]} rows but image_index reaches "
                             f"{int(image_index.max())}; rows must align with the prepared file's images")
        # h5py fancy indexing needs increasing unique rows
        rows, inverse = np.unique(image_index, return_inverse=True)
        values = np.asarray(ds[rows], dtype=np.float32)[inverse]
    if not np.isfinite(values).all():
        raise ValueError(f"{targets}: {name} contains NaN/inf in the requested rows")
    return values
