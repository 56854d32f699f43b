"""THINGS-fMRI loader: reads the ``betas_csv`` table release (see docs/data-formats.md).

Trial j is column j of ``sub-XX_ResponseData.h5`` (rows = voxels) and row j of
``sub-XX_StimulusMetadata.csv``; an ROI is the union of 0/1 columns of
``sub-XX_VoxelMetadata.csv`` (never a fixed column set); test images are the
``trial_type == test`` stimuli; each image's single caption is
``"<Word>: <Definition>"`` from ``things_concepts.tsv``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from brainldm.train.data.nsd import resize_square
from brainldm.train.data.prepare import DatasetConfig, RawData

RESPONSES = "betas_csv/sub-{:02d}_ResponseData.h5"
RESPONSE_KEY = "ResponseData"
VOXELS = "betas_csv/sub-{:02d}_VoxelMetadata.csv"
STIMULI = "betas_csv/sub-{:02d}_StimulusMetadata.csv"
IMAGES = "object_images"
CONCEPTS = "things_concepts.tsv"
NOISE_CEILING_PREFIX = "nc_"  # nc_testset, nc_singletrial: from the test repeats
CONCEPT_WORD, CONCEPT_DEFINITION = "Word", "Definition (from WordNet, Google, or Wikipedia)"
STIMULUS_COLUMNS = ("trial_type", "session", "run", "trial_id", "stimulus")
TRIAL_TYPES = ("train", "test")
VOXEL_CHUNK = 5_000  # voxel rows read at once (~5000 x 9840 trials): bounds memory


def subject_name(subject: int) -> str:
    """THINGS' name of a 1-based subject: 1 -> ``sub-01``."""
    return f"sub-{subject:02d}"


def concept_of(stimulus: str) -> str:
    """Concept of a stimulus file name: ``ice_cream_03s.jpg`` -> ``ice_cream``."""
    return stimulus.rsplit("_", 1)[0]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"THINGS file not found: {path}")
    return path


def read_stimuli(path: Path) -> pd.DataFrame:
    """The trial table (one row per trial, in ResponseData column order), validated."""
    table = pd.read_csv(_require(path))
    missing = [c for c in STIMULUS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(STIMULUS_COLUMNS)}")
    bad = sorted(set(table["trial_type"]) - set(TRIAL_TYPES))
    if bad:
        raise ValueError(f"{path}: trial_type values {bad}; expected {list(TRIAL_TYPES)}")
    duplicated = table.duplicated(["session", "run", "trial_id"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise ValueError(f"{path}: duplicated trial (session, run, trial_id) at row {row}; expected one row per trial")
    kinds = table.groupby("stimulus")["trial_type"].nunique()
    both = sorted(kinds.index[kinds > 1])
    if both:
        raise ValueError(f"{path}: stimuli {both[:5]} appear as both train and test; expected disjoint sets")
    return table


def roi_voxel_ids(path: Path, rois: dict) -> dict[str, np.ndarray]:
    """ROI name -> sorted voxel ids (V_roi,) int64: union of the ROI's 0/1 columns."""
    meta = pd.read_csv(_require(path))
    if "voxel_id" not in meta.columns:
        raise ValueError(f"{path}: no voxel_id column")
    if meta["voxel_id"].duplicated().any():
        raise ValueError(f"{path}: duplicated voxel_id rows; expected one row per voxel")
    out = {}
    for name, spec in rois.items():
        _refuse_test_statistics(path, name, spec.columns)
        missing = [c for c in spec.columns if c not in meta.columns]
        if not spec.columns or missing:
            raise ValueError(f"{path}: ROI {name!r} columns {list(spec.columns)} missing {missing}; "
                             f"available: {[c for c in meta.columns if c != 'voxel_id']}")
        flags = meta[list(spec.columns)].to_numpy()
        if not np.isin(flags, (0, 1)).all():
            raise ValueError(f"{path}: ROI columns {list(spec.columns)} hold values other than 0/1")
        ids = np.sort(meta.loc[flags.any(axis=1), "voxel_id"].to_numpy(np.int64))
        if ids.size == 0:
            raise ValueError(f"{path}: ROI {name!r} (columns {list(spec.columns)}) selects zero voxels")
        out[name] = ids
    return out


def _refuse_test_statistics(path: Path, name: str, columns: Sequence[str]) -> None:
    # THINGS computes nc_testset / nc_singletrial from the test images' repeats: a voxel selection
    # made with them has seen the test set, so the test scores would be optimistic.
    leaking = [c for c in columns if c.startswith(NOISE_CEILING_PREFIX)]
    if leaking:
        raise ValueError(
            f"{path}: ROI {name!r} uses {leaking}, noise ceilings computed from the test set's repeats; "
            f"expected anatomical or localiser columns (e.g. V1, lFFA): selecting voxels by test data leaks it"
        )


def read_responses(path: Path, voxel_ids: np.ndarray, n_trials: int) -> np.ndarray:
    """Selected voxels, all trials: (n_trials, V) float32, columns in ``voxel_ids`` order.

    Reads ``VOXEL_CHUNK`` rows at a time so only the selected voxels are kept.
    """
    found: dict[int, np.ndarray] = {}
    wanted = set(voxel_ids.tolist())
    start = 0
    with tqdm(desc="things voxels", unit="voxel", leave=False) as bar:
        while True:
            chunk = pd.read_hdf(_require(path), RESPONSE_KEY, start=start, stop=start + VOXEL_CHUNK)
            if start == 0:
                _check_trial_columns(path, chunk.columns, n_trials)
            keep = chunk["voxel_id"].isin(wanted).to_numpy()
            for vid, row in zip(chunk["voxel_id"].to_numpy(np.int64)[keep], chunk.iloc[:, 1:].to_numpy()[keep]):
                if vid in found:
                    raise ValueError(f"{path}: voxel_id {vid} appears twice")
                found[int(vid)] = row.astype(np.float32)
            bar.update(len(chunk))
            start += VOXEL_CHUNK
            if len(chunk) < VOXEL_CHUNK:
                break
    absent = [int(v) for v in voxel_ids if v not in found]
    if absent:
        raise ValueError(f"{path}: ROI voxel ids {absent[:10]} (of {len(absent)}) have no response row")
    out = np.stack([found[int(v)] for v in voxel_ids], axis=1)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{path}: {int((~np.isfinite(out)).sum())} non-finite betas in the selected voxels")
    return out


def _check_trial_columns(path: Path, columns: pd.Index, n_trials: int) -> None:
    if len(columns) == 0 or columns[0] != "voxel_id":
        raise ValueError(f"{path}: first column must be voxel_id, got {list(columns[:1])}")
    trial_cols = [str(c) for c in columns[1:]]
    if trial_cols != [str(i) for i in range(n_trials)]:
        raise ValueError(
            f"{path}: {len(trial_cols)} trial columns; expected columns 0..{n_trials - 1} "
            f"(one per row of the stimulus metadata)"
        )


def load_captions(root: Path, concepts: Sequence[str]) -> list[list[str]]:
    """One caption per image: ``"<Word>: <Definition>"`` (concept name when the TSV lacks it)."""
    path = _require(Path(root) / CONCEPTS)
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "uniqueID" not in table.columns:
        raise ValueError(f"{path}: no uniqueID column; expected uniqueID, {CONCEPT_WORD}, {CONCEPT_DEFINITION}")
    rows = table.drop_duplicates("uniqueID").set_index("uniqueID")
    out = []
    for concept in concepts:
        word = rows.at[concept, CONCEPT_WORD].strip() if concept in rows.index and CONCEPT_WORD in rows else ""
        definition = (
            rows.at[concept, CONCEPT_DEFINITION].strip() if concept in rows.index and CONCEPT_DEFINITION in rows else ""
        )
        word = word or concept.replace("_", " ")
        out.append([f"{word}: {definition}" if definition else word])
    return out


def load_images(root: Path, stimuli: Sequence[str], size: int | None) -> np.ndarray:
    """(N, size, size, 3) uint8 from ``object_images/<concept>/<stimulus>`` (LANCZOS)."""
    out = []
    for stimulus in tqdm(stimuli, desc="things images", leave=False):
        path = _require(Path(root) / IMAGES / concept_of(stimulus) / stimulus)
        with Image.open(path) as img:
            out.append(resize_square(np.asarray(img.convert("RGB")), size))
    shapes = {im.shape for im in out}
    if len(shapes) > 1:
        raise ValueError(f"THINGS images in {Path(root) / IMAGES} differ in size {sorted(shapes)[:3]}; set image_size")
    return np.stack(out)


def select_trials(table: pd.DataFrame, count: int | None, path: Path) -> np.ndarray:
    """Trials (rows) of the first ``count`` sessions (all when None): (n,) int64."""
    present = sorted(table["session"].unique().tolist())
    if count is not None:
        if count < 1 or count > len(present):
            raise ValueError(f"{path}: {count} sessions requested but only {len(present)} present {present}")
        present = present[:count]
    return np.flatnonzero(table["session"].isin(present).to_numpy()).astype(np.int64)


def load(ds: DatasetConfig) -> RawData:
    """Load one THINGS-fMRI subject: raw responses of the ROIs, trials, images, captions.

    image_ids = first row of each stimulus in the stimulus metadata (0-based).
    """
    root, sub = Path(ds.root), subject_name(ds.subject)
    # 1. trials, sessions and ROI voxels
    stim_path = root / STIMULI.format(ds.subject)
    table = read_stimuli(stim_path)
    trials = select_trials(table, ds.sessions, stim_path)
    roi_ids = roi_voxel_ids(root / VOXELS.format(ds.subject), ds.rois)
    voxel_ids = np.unique(np.concatenate(list(roi_ids.values())))
    # 2. responses of the selected voxels, selected trials
    betas = read_responses(root / RESPONSES.format(ds.subject), voxel_ids, len(table))[trials]
    # 3. images in first-appearance order of the full table
    stimulus = table["stimulus"].astype(str).to_numpy()
    first_row = table.reset_index().drop_duplicates("stimulus").set_index("stimulus")["index"]
    trial_rows = first_row[stimulus[trials]].to_numpy(np.int64)
    shown = np.unique(trial_rows)
    names = [stimulus[r] for r in shown]
    is_test = table["trial_type"].to_numpy()[shown] == "test"
    return RawData(
        source="things",
        subject=sub,
        betas=betas,
        voxel_ids=voxel_ids,
        roi_columns={name: np.searchsorted(voxel_ids, ids) for name, ids in roi_ids.items()},
        trial_image=np.searchsorted(shown, trial_rows).astype(np.int64),
        trial_session=table["session"].to_numpy(np.int64)[trials],
        image_ids=shown,
        image_names=names,
        image_is_test=is_test,
        images=load_images(root, names, ds.image_size),
        captions=load_captions(root, [concept_of(n) for n in names]),
    )
