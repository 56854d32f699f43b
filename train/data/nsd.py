"""Natural Scenes Dataset loader: reads NSD's own on-disk layout (see docs/data-formats.md).

Everything is read from the native files: the experimental design
(``nsd_expdesign.mat``) maps trials to 73k image ids, ``sharedix`` defines the test
images, ROI volumes (X, Y, Z) select voxels by ctab label name or integer, and
betas are read one session at a time (HDF5 ``(trials, Z, Y, X)`` or NIfTI
``(X, Y, Z, trials)``, int16 x 300) keeping only the selected voxels. The design is
cross-checked against ``behav/responses.tsv`` for the sessions loaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
from PIL import Image
from tqdm import tqdm

from brainldm.runtime.preprocess import NSD_INT16_SCALE
from brainldm.train.data.prepare import DatasetConfig, RawData

EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
RESPONSES = "nsddata/ppdata/{subj}/behav/responses.tsv"
ROI_FILE = "nsddata/ppdata/{subj}/func1pt8mm/roi/{atlas}.nii.gz"
CTAB = "nsddata/freesurfer/fsaverage/label/{atlas}.mgz.ctab"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
CAPTIONS = "nsddata_stimuli/stimuli/nsd/annotations/captions_{split}.json"
BETAS_DIR = "nsddata_betas/ppdata/{subj}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
BETAS_NAME = {"hdf5": "betas_session{:02d}.hdf5", "nifti": "betas_session{:02d}.nii.gz"}
BETAS_PATTERN = {"hdf5": r"betas_session(\d+)\.hdf5$", "nifti": r"betas_session(\d+)\.nii\.gz$"}
TRIAL_CHUNK = 64  # HDF5 trials read at once: bounds memory per read
IMAGE_CHUNK = 256


def subject_dir(subject: int) -> str:
    """NSD's folder name of a 1-based subject: 1 -> ``subj01``."""
    return f"subj{subject:02d}"


@dataclass(frozen=True)
class ExpDesign:
    """masterordering (T,) int64 1-based into the 10k list; subjectim (8, n10k) int64
    1-based 73k ids; sharedix (n_shared,) int64 1-based 73k ids."""

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    path: Path


def load_expdesign(root: Path) -> ExpDesign:
    """Read and validate ``nsd_expdesign.mat``."""
    path = Path(root) / EXPDESIGN
    if not path.is_file():
        raise FileNotFoundError(f"NSD experimental design not found: {path}")
    mat = scipy.io.loadmat(path)
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing:
        raise ValueError(f"{path}: missing variable(s) {missing}; expected masterordering, subjectim, sharedix")
    subjectim = np.asarray(mat["subjectim"])
    if subjectim.ndim != 2:
        raise ValueError(f"{path}: subjectim has shape {subjectim.shape}; expected (subjects, n_images)")
    design = ExpDesign(
        masterordering=np.asarray(mat["masterordering"]).reshape(-1).astype(np.int64),
        subjectim=subjectim.astype(np.int64),
        sharedix=np.asarray(mat["sharedix"]).reshape(-1).astype(np.int64),
        path=path,
    )
    if len(np.unique(design.sharedix)) != len(design.sharedix):
        raise ValueError(f"{path}: sharedix holds duplicated 73k ids; expected unique ids")
    return design


def trial_image_ids(design: ExpDesign, subject: int, n_trials: int) -> np.ndarray:
    """0-based 73k id shown on each of the first ``n_trials`` trials: (n_trials,) int64.

    Trial t shows ``subjectim[subject-1, masterordering[t]-1]`` (both 1-based).
    """
    where = design.path
    if not 1 <= subject <= design.subjectim.shape[0]:
        raise ValueError(f"{where}: subject {subject} not in subjectim (1..{design.subjectim.shape[0]})")
    if n_trials > len(design.masterordering):
        raise ValueError(
            f"{where}: betas hold {n_trials} trials but masterordering lists only {len(design.masterordering)}"
        )
    images = design.subjectim[subject - 1]
    if np.any(images < 1) or len(np.unique(images)) != len(images):
        raise ValueError(f"{where}: subjectim row {subject} must hold unique 1-based 73k ids (duplicates or < 1)")
    order = design.masterordering[:n_trials]
    if np.any(order < 1) or np.any(order > len(images)):
        raise ValueError(f"{where}: masterordering values must lie in 1..{len(images)}")
    return images[order - 1] - 1


def read_ctab(path: Path) -> dict[str, int]:
    """Label name -> integer from a FreeSurfer ctab file (``<int> <name>`` lines)."""
    if not path.is_file():
        raise FileNotFoundError(f"ROI colour table not found: {path} (needed to resolve ROI label names)")
    table = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"-?\d+", parts[0]):
            table[parts[1]] = int(parts[0])
    return table


def resolve_labels(root: Path, atlas: str, labels: Sequence[str | int]) -> list[int]:
    """Integer labels for ``labels`` (ints pass through, names looked up in the atlas ctab)."""
    if not labels:
        raise ValueError(f"ROI on atlas {atlas!r}: no labels given; expected label names or integers")
    ctab_path = Path(root) / CTAB.format(atlas=atlas)
    table = read_ctab(ctab_path) if any(isinstance(lab, str) for lab in labels) else {}
    out = []
    for lab in labels:
        if isinstance(lab, str):
            if lab not in table:
                raise ValueError(f"{ctab_path}: no label named {lab!r}; available: {sorted(table)}")
            out.append(table[lab])
        else:
            out.append(int(lab))
    return out


def roi_volume(root: Path, subject: int, atlas: str) -> tuple[np.ndarray, Path]:
    """The atlas label volume (X, Y, Z) int64 (-1 outside brain, 0 outside ROIs)."""
    path = Path(root) / ROI_FILE.format(subj=subject_dir(subject), atlas=atlas)
    if not path.is_file():
        raise FileNotFoundError(f"ROI volume not found: {path}")
    volume = np.asarray(nib.load(path).dataobj)
    if volume.ndim != 3:
        raise ValueError(f"{path}: ROI volume has shape {volume.shape}; expected 3-D (X, Y, Z)")
    return np.rint(volume).astype(np.int64), path


def roi_voxel_ids(root: Path, subject: int, atlas: str, labels: Sequence[str | int]) -> tuple[np.ndarray, tuple]:
    """Sorted flat C-order indices (V,) int64 into the (X, Y, Z) grid, and the grid shape."""
    volume, path = roi_volume(root, subject, atlas)
    ids = np.flatnonzero(np.isin(volume.reshape(-1), resolve_labels(root, atlas, labels)))
    if ids.size == 0:
        raise ValueError(f"{path}: labels {list(labels)} select zero voxels; expected a non-empty ROI")
    return ids.astype(np.int64), volume.shape


def select_test_images(trial_ids: np.ndarray, shared: np.ndarray, min_repeats: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Trials kept (T,) bool and the sorted 0-based 73k ids (N,) of the images they show.

    Test images are the shared images (``shared``, 0-based) shown at least ``min_repeats`` times
    in these trials (every one shown when None). A shared image shown fewer times is dropped with
    its trials: it is not a test image, and it must not enter training, because it is every other
    subject's test image. As published: the 37 sessions of the first release show 982 shared
    images at least once (the test set of MindEye1 and Brain-Diffuser, 8,859 training images);
    all 40 sessions show each of the 1000 three times; a minimum of 3 keeps only test images
    averaged over three repeats.
    """
    image_ids, repeats = np.unique(trial_ids, return_counts=True)
    dropped = np.isin(image_ids, shared) & (repeats < (min_repeats or 1))
    kept = image_ids[~dropped]
    if min_repeats is not None and not np.isin(kept, shared).any():
        raise ValueError(f"test_min_repeats {min_repeats}: no shared image is shown that often in these "
                         f"{len(trial_ids)} trials (most: {repeats[np.isin(image_ids, shared)].max(initial=0)}); "
                         f"expected a smaller minimum or more sessions")
    return ~np.isin(trial_ids, image_ids[dropped]), kept


def resize_square(image: np.ndarray, size: int | None) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 (LANCZOS); unchanged when size is None."""
    if size is None:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS), dtype=np.uint8)


def select_sessions(root: Path, subject: int, fmt: str, count: int | None) -> list[Path]:
    """Betas files of sessions 1..count (all present when count is None), in order."""
    if fmt not in BETAS_NAME:
        raise ValueError(f"betas_format {fmt!r}; expected one of {sorted(BETAS_NAME)}")
    folder = Path(root) / BETAS_DIR.format(subj=subject_dir(subject))
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    present = sorted(int(m.group(1)) for name in names if (m := re.match(BETAS_PATTERN[fmt], name)))
    if count is None:
        if not present:
            raise FileNotFoundError(f"no {fmt} betas files ({BETAS_NAME[fmt].format(1)}, ...) in {folder}")
        count = present[-1]
    if count < 1:
        raise ValueError(f"sessions: {count}; expected a positive count or null (all present)")
    wanted = [folder / BETAS_NAME[fmt].format(s) for s in range(1, count + 1)]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {count} requested sessions are missing: {missing} (present: {present})"
        )
    return wanted


def session_trials(path: Path, fmt: str, grid: tuple) -> int:
    """Number of trials in a betas file; checks its voxel grid against the ROI grid (X, Y, Z)."""
    if fmt == "hdf5":
        with h5py.File(path, "r") as f:
            if "betas" not in f:
                raise ValueError(f"{path}: no dataset 'betas'; expected (trials, Z, Y, X) int16")
            shape = f["betas"].shape
        expected, space = tuple(grid[::-1]), shape[1:]
    else:
        shape = nib.load(path).shape
        expected, space = tuple(grid), shape[:3]
    if len(shape) != 4 or tuple(space) != expected:
        layout = "(trials, Z, Y, X)" if fmt == "hdf5" else "(X, Y, Z, trials)"
        raise ValueError(f"{path}: betas shape {shape} does not match the ROI grid {tuple(grid)}; expected {layout}")
    return int(shape[0] if fmt == "hdf5" else shape[3])


def read_session(path: Path, fmt: str, voxel_ids: np.ndarray, grid: tuple) -> np.ndarray:
    """Selected voxels of one session: (trials, V) float32 in percent signal change (/300).

    ``voxel_ids`` are flat C-order indices into the (X, Y, Z) ROI grid; HDF5 betas are
    (trials, Z, Y, X), i.e. the ROI volume transposed (2, 1, 0).
    """
    x, y, z = np.unravel_index(voxel_ids, grid)
    if fmt == "hdf5":
        with h5py.File(path, "r") as f:
            data = f["betas"]
            chunks = [data[t : t + TRIAL_CHUNK][:, z, y, x] for t in range(0, data.shape[0], TRIAL_CHUNK)]
        selected = np.concatenate(chunks, axis=0)
    else:
        volume = np.asarray(nib.load(path).dataobj)
        selected = volume[x, y, z, :].T
    out = selected.astype(np.float32) / np.float32(NSD_INT16_SCALE)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{path}: {int((~np.isfinite(out)).sum())} non-finite betas in the selected voxels")
    return out


def check_responses(root: Path, subject: int, image_ids: np.ndarray, trials_per_session: Sequence[int]) -> None:
    """Cross-check the design mapping against ``responses.tsv`` (73KID, 1-based) per session."""
    path = Path(root) / RESPONSES.format(subj=subject_dir(subject))
    if not path.is_file():
        raise FileNotFoundError(f"behavioural responses not found: {path}")
    table = pd.read_csv(path, sep="\t")
    missing = [c for c in ("SESSION", "73KID") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected SESSION and 73KID")
    order = [c for c in ("SESSION", "RUN", "TRIAL") if c in table.columns]
    table = table.sort_values(order, kind="stable")
    start = 0
    for session, n in enumerate(trials_per_session, start=1):
        logged = table.loc[table["SESSION"] == session, "73KID"].to_numpy(np.int64) - 1
        expected = image_ids[start : start + n]
        if len(logged) != n:
            raise ValueError(f"{path}: session {session} logs {len(logged)} trials; its betas hold {n}")
        bad = np.flatnonzero(logged != expected)
        if bad.size:
            raise ValueError(
                f"{path}: session {session} trial {bad[0] + 1} shows 73KID {logged[bad[0]] + 1} but "
                f"nsd_expdesign.mat maps it to {expected[bad[0]] + 1}; design and responses disagree"
            )
        start += n


def load_images(root: Path, image_ids: np.ndarray, size: int | None) -> np.ndarray:
    """Stimuli for sorted unique 0-based 73k ids: (N, H, W, 3) uint8 (or (N, size, size, 3))."""
    path = Path(root) / STIMULI
    if not path.is_file():
        raise FileNotFoundError(f"NSD stimuli not found: {path}")
    with h5py.File(path, "r") as f:
        if "imgBrick" not in f or f["imgBrick"].ndim != 4 or f["imgBrick"].shape[3] != 3:
            raise ValueError(f"{path}: expected dataset 'imgBrick' of shape (N, H, W, 3) uint8")
        brick = f["imgBrick"]
        if image_ids.size and image_ids.max() >= brick.shape[0]:
            raise ValueError(f"{path}: imgBrick has {brick.shape[0]} images; id {image_ids.max()} requested")
        out = []
        for start in tqdm(range(0, len(image_ids), IMAGE_CHUNK), desc="nsd images", leave=False):
            block = brick[image_ids[start : start + IMAGE_CHUNK]]
            out.extend(resize_square(img, size) for img in block)
    return np.stack(out).astype(np.uint8)


def load_captions(root: Path, image_ids: np.ndarray) -> list[list[str]]:
    """COCO captions of each 0-based 73k id (list of >= 1 strings per image)."""
    info_path = Path(root) / STIM_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"NSD stimulus info not found: {info_path}")
    info = pd.read_csv(info_path)
    missing = [c for c in ("nsdId", "cocoId", "cocoSplit") if c not in info.columns]
    if missing:
        raise ValueError(f"{info_path}: missing column(s) {missing}; expected nsdId, cocoId, cocoSplit")
    if info["nsdId"].duplicated().any():
        raise ValueError(f"{info_path}: duplicated nsdId rows; expected one row per 73k image")
    info = info.set_index("nsdId")
    absent = [int(i) for i in image_ids if i not in info.index]
    if absent:
        raise ValueError(f"{info_path}: no row for nsdId {absent[:10]}")
    by_split: dict[str, dict[int, list[str]]] = {}
    captions = []
    for i in image_ids:
        coco_id, split = int(info.at[i, "cocoId"]), str(info.at[i, "cocoSplit"])
        if split not in by_split:
            by_split[split] = _coco_captions(Path(root) / CAPTIONS.format(split=split))
        texts = by_split[split].get(coco_id)
        if not texts:
            raise ValueError(f"{CAPTIONS.format(split=split)}: no caption for cocoId {coco_id} (nsdId {i})")
        captions.append(texts)
    return captions


def _coco_captions(path: Path) -> dict[int, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions not found: {path}")
    annotations = json.loads(path.read_text(encoding="utf-8")).get("annotations")
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: expected a COCO file with an 'annotations' list")
    table: dict[int, list[tuple[int, str]]] = {}
    for ann in annotations:
        table.setdefault(int(ann["image_id"]), []).append((int(ann.get("id", 0)), str(ann["caption"]).strip()))
    return {k: [c for _, c in sorted(v)] for k, v in table.items()}


def load_rois(root: Path, subject: int, rois: dict) -> tuple[dict[str, np.ndarray], tuple]:
    """ROI name -> sorted voxel ids (flat C-order into (X, Y, Z)); all atlases share one grid."""
    ids, grid = {}, None
    for name, spec in rois.items():
        if not spec.atlas:
            raise ValueError(f"NSD ROI {name!r}: no atlas given; expected e.g. atlas: prf-visualrois")
        ids[name], shape = roi_voxel_ids(root, subject, spec.atlas, spec.labels)
        if grid is not None and shape != grid:
            raise ValueError(f"ROI {name!r} ({spec.atlas}) grid {shape} differs from the other ROIs' grid {grid}")
        grid = shape
    if grid is None:
        raise ValueError("no ROIs configured; expected at least one ROI")
    return ids, grid


def load(ds: DatasetConfig) -> RawData:
    """Load one NSD subject: raw betas of the configured ROIs, trial -> image mapping, stimuli.

    Returns RawData with betas (T, V_all) float32 percent signal change, trial_session
    1-based, image_ids sorted 0-based 73k ids, image_is_test from ``sharedix``.
    """
    root, subject = Path(ds.root), ds.subject
    # 1. ROI voxels and the grid every betas file must match
    roi_ids, grid = load_rois(root, subject, ds.rois)
    voxel_ids = np.unique(np.concatenate(list(roi_ids.values())))
    # 2. sessions: trial counts from the files' shapes, checked against the design
    files = select_sessions(root, subject, ds.betas_format, ds.sessions)
    counts = [session_trials(p, ds.betas_format, grid) for p in files]
    design = load_expdesign(root)
    trial_ids = trial_image_ids(design, subject, sum(counts))
    check_responses(root, subject, trial_ids, counts)
    # 3. betas, one session at a time, selected voxels only
    betas = np.concatenate(
        [read_session(p, ds.betas_format, voxel_ids, grid)
         for p in tqdm(files, desc=f"nsd {subject_dir(subject)} betas")]
    )
    # 4. images shown, test = sharedix shown test_min_repeats times, stimuli and captions
    kept, image_ids = select_test_images(trial_ids, design.sharedix - 1, ds.test_min_repeats)
    trial_ids = trial_ids[kept]
    return RawData(
        source="nsd",
        subject=subject_dir(subject),
        betas=betas[kept],
        voxel_ids=voxel_ids,
        roi_columns={name: np.searchsorted(voxel_ids, ids) for name, ids in roi_ids.items()},
        trial_image=np.searchsorted(image_ids, trial_ids).astype(np.int64),
        trial_session=np.repeat(np.arange(1, len(counts) + 1), counts)[kept].astype(np.int64),
        image_ids=image_ids.astype(np.int64),
        image_names=[f"nsd-{i}" for i in image_ids],
        image_is_test=np.isin(image_ids, design.sharedix - 1),
        images=load_images(root, image_ids, ds.image_size),
        captions=load_captions(root, image_ids),
    )
