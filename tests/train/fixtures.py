"""Tiny NSD and THINGS-fMRI fixtures in the REAL on-disk formats (the layouts train/data/nsd.py and train/data/things.py read).

Written independently of train/simulation/simulate.py: every value is known to the test, so
loaders can be checked exactly (trial -> image mapping, transposes, scaling, ROIs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

NSD_GRID = (5, 4, 3)  # (X, Y, Z): asymmetric so a wrong transpose cannot pass
NSD_LABELS = {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"}
# label -> voxel coordinates (x, y, z) in the ROI volume
NSD_ROI_COORDS = {
    1: [(0, 0, 0), (4, 1, 2)],
    2: [(1, 3, 0)],
    3: [(2, 0, 1), (3, 2, 2)],
    4: [(4, 3, 1)],
    5: [(0, 2, 2)],
    6: [(3, 1, 0)],
    7: [(1, 1, 1), (2, 3, 2)],
}
NSD_OUTSIDE_BRAIN = [(4, 0, 0), (0, 3, 2)]
NSD_SHARED = np.array([5, 17, 2])  # 1-based 73k ids of the shared (test) images
N_73K, N_10K, N_SUBJECTS = 24, 12, 8
IMAGE_HW = (6, 5)


@dataclass
class NsdFixture:
    """root; betas (T, X, Y, Z) int16 as stored; trial_ids (T,) 0-based 73k ids;
    shared (n,) 0-based; images (N_73K, H, W, 3) uint8; captions 0-based id -> list."""

    root: Path
    subject: int
    betas: np.ndarray
    trials_per_session: list[int]
    trial_ids: np.ndarray
    shared: np.ndarray
    images: np.ndarray
    captions: dict[int, list[str]] = field(default_factory=dict)


def subj(subject: int) -> str:
    return f"subj{subject:02d}"


def betas_dir(root: Path, subject: int) -> Path:
    return root / "nsddata_betas/ppdata" / subj(subject) / "func1pt8mm/betas_fithrf_GLMdenoise_RR"


def write_hdf5_session(root: Path, subject: int, session: int, betas_txyz: np.ndarray) -> Path:
    """Write (T, X, Y, Z) betas as NSD's HDF5 (T, Z, Y, X)."""
    path = betas_dir(root, subject) / f"betas_session{session:02d}.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=np.ascontiguousarray(betas_txyz.transpose(0, 3, 2, 1)))
    return path


def write_nifti_session(root: Path, subject: int, session: int, betas_txyz: np.ndarray) -> Path:
    """Write (T, X, Y, Z) betas as NSD's NIfTI (X, Y, Z, T)."""
    path = betas_dir(root, subject) / f"betas_session{session:02d}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(betas_txyz.transpose(1, 2, 3, 0)), np.eye(4)), path)
    return path


def nsd_roi_volume(grid=NSD_GRID) -> np.ndarray:
    volume = np.zeros(grid, np.int16)
    for coord in NSD_OUTSIDE_BRAIN:
        volume[coord] = -1
    for label, coords in NSD_ROI_COORDS.items():
        for coord in coords:
            volume[coord] = label
    return volume


def write_nsd_roi(root: Path, subject: int, atlas: str, volume: np.ndarray, labels: dict[int, str]) -> None:
    roi = root / "nsddata/ppdata" / subj(subject) / "func1pt8mm/roi" / f"{atlas}.nii.gz"
    roi.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), roi)
    ctab = root / "nsddata/freesurfer/fsaverage/label" / f"{atlas}.mgz.ctab"
    ctab.parent.mkdir(parents=True, exist_ok=True)
    lines = ["0 Unknown 0 0 0 0"] + [f"{k} {name} {k * 30} 0 0 0" for k, name in sorted(labels.items())]
    ctab.write_text("\n".join(lines) + "\n")


def _nsd_design(rng: np.random.Generator, subject: int, n_sessions: int, per_session: int):
    """subjectim (8, 12) 1-based, masterordering (1-based into the 10k list) of the loaded trials + spares."""
    subjectim = np.zeros((N_SUBJECTS, N_10K), np.int64)
    others = np.setdiff1d(np.arange(1, N_73K + 1), NSD_SHARED)
    for s in range(N_SUBJECTS):
        row = np.concatenate([NSD_SHARED, rng.choice(others, N_10K - len(NSD_SHARED), replace=False)])
        subjectim[s] = rng.permutation(row)
    n_trials = n_sessions * per_session
    pool = np.tile(np.arange(1, N_10K + 1), n_trials // N_10K + 1)[:n_trials]
    order = rng.permutation(pool)
    spares = rng.integers(1, N_10K + 1, size=5)  # design lists more trials than are loaded
    return subjectim, np.concatenate([order, spares])


def build_nsd(
    root: Path, subject: int = 1, n_sessions: int = 3, per_session: int = 8, fmt: str = "hdf5", seed: int = 0
) -> NsdFixture:
    """Write a complete tiny NSD tree under ``root``; fmt hdf5 | nifti | both."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    subjectim, masterordering = _nsd_design(rng, subject, n_sessions, per_session)
    n_trials = n_sessions * per_session
    trial_ids = subjectim[subject - 1, masterordering[:n_trials] - 1] - 1
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(design / "nsd_expdesign.mat", {
        "masterordering": masterordering[None, :].astype(np.float64),
        "subjectim": subjectim.astype(np.float64),
        "sharedix": NSD_SHARED[None, :].astype(np.float64),
    })
    captions = _write_nsd_stimuli(root, rng)
    _write_responses(root, subject, trial_ids, n_sessions, per_session)
    write_nsd_roi(root, subject, "prf-visualrois", nsd_roi_volume(), NSD_LABELS)
    betas = rng.integers(-3000, 3000, size=(n_trials,) + NSD_GRID).astype(np.int16)
    for k in range(n_sessions):
        block = betas[k * per_session : (k + 1) * per_session]
        if fmt in ("hdf5", "both"):
            write_hdf5_session(root, subject, k + 1, block)
        if fmt in ("nifti", "both"):
            write_nifti_session(root, subject, k + 1, block)
    images = _nsd_images()
    return NsdFixture(root, subject, betas, [per_session] * n_sessions, trial_ids, NSD_SHARED - 1, images, captions)


def _nsd_images() -> np.ndarray:
    h, w = IMAGE_HW
    base = np.arange(h * w * 3).reshape(h, w, 3)
    return np.stack([(base + 7 * k) % 256 for k in range(N_73K)]).astype(np.uint8)


def _write_nsd_stimuli(root: Path, rng: np.random.Generator) -> dict[int, list[str]]:
    stim = root / "nsddata_stimuli/stimuli/nsd"
    (stim / "annotations").mkdir(parents=True, exist_ok=True)
    with h5py.File(stim / "nsd_stimuli.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=_nsd_images())
    nsd_ids = np.arange(N_73K)
    info = pd.DataFrame({
        "cocoId": 500000 + 7 * nsd_ids,
        "cocoSplit": np.where(nsd_ids % 2 == 0, "train2017", "val2017"),
        "cropBox": ["(0, 0, 0, 0)"] * N_73K,
        "nsdId": nsd_ids,
        "shared1000": np.isin(nsd_ids, NSD_SHARED - 1),
    })
    info.to_csv(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv")
    captions: dict[int, list[str]] = {}
    coco: dict[str, list] = {"train2017": [], "val2017": []}
    for i in nsd_ids:
        split = info.at[i, "cocoSplit"]
        texts = [f"picture {i} caption {c}" for c in range(2)]
        captions[int(i)] = texts
        for c, text in enumerate(texts):
            coco[split].append({"image_id": int(info.at[i, "cocoId"]), "id": int(1000 * i + c), "caption": text})
    for split, entries in coco.items():
        shuffled = [entries[j] for j in rng.permutation(len(entries))]
        (stim / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": [], "annotations": shuffled})
        )
    return captions


def _write_responses(root: Path, subject: int, trial_ids: np.ndarray, n_sessions: int, per_session: int) -> None:
    half = per_session // 2
    rows = []
    for t, image in enumerate(trial_ids):
        session, within = divmod(t, per_session)
        run, trial = divmod(within, half)
        rows.append({"SUBJECT": subject, "SESSION": session + 1, "RUN": run + 1, "TRIAL": trial + 1,
                     "73KID": int(image) + 1, "ISOLD": 0})
    path = root / "nsddata/ppdata" / subj(subject) / "behav/responses.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).iloc[::-1].to_csv(path, sep="\t", index=False)  # file order must not matter


# ---------------------------------------------------------------- THINGS-fMRI
THINGS_CONCEPTS = ["aardvark", "ice_cream", "dog", "bat"]
THINGS_TEST = ["dog_13s.jpg", "ice_cream_14s.jpg"]
THINGS_ROIS = ["V1", "V2", "V3", "hV4", "lFFA", "rFFA", "lPPA", "rPPA"]
THINGS_DEFINITIONS = {
    "aardvark": ("aardvark", "nocturnal burrowing mammal"),
    "dog": ("dog", "a domesticated canid"),
    "bat": ("bat", "a flying mammal"),
}  # ice_cream is missing on purpose: its caption falls back to "ice cream"


@dataclass
class ThingsFixture:
    """root; table (stimulus metadata); betas (T, n_vox) float32 in voxel_ids order;
    voxel_ids (n_vox,) int64; roi_flags DataFrame voxel_id + ROI columns."""

    root: Path
    subject: int
    table: pd.DataFrame
    betas: np.ndarray
    voxel_ids: np.ndarray
    roi_flags: pd.DataFrame


def things_train_stimuli() -> list[str]:
    return [f"{c}_{k:02d}b.jpg" for c in THINGS_CONCEPTS for k in range(1, 4)]


def build_things(root: Path, subject: int = 1, n_sessions: int = 3, seed: int = 0) -> ThingsFixture:
    """Write a tiny THINGS-fMRI tree: 12 train images once each, 2 test images every session."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    train = rng.permutation(things_train_stimuli())
    per_session = len(train) // n_sessions
    rows, trial_id = [], 0
    for s in range(n_sessions):
        stimuli = list(train[s * per_session : (s + 1) * per_session]) + THINGS_TEST
        for k, stimulus in enumerate(rng.permutation(stimuli)):
            kind = "test" if stimulus in THINGS_TEST else "train"
            rows.append({"trial_type": kind, "session": s + 1, "run": k % 2 + 1, "subject_id": subject,
                         "trial_id": trial_id, "stimulus": stimulus})
            trial_id += 1
    table = pd.DataFrame(rows)
    betas_dir_ = root / "betas_csv"
    betas_dir_.mkdir(parents=True, exist_ok=True)
    table.to_csv(betas_dir_ / f"sub-{subject:02d}_StimulusMetadata.csv", index=False)
    voxel_ids = np.arange(10) * 3 + 100
    flags = _things_roi_flags(voxel_ids)
    meta = pd.DataFrame({"voxel_id": voxel_ids, "subject_id": subject, "voxel_x": voxel_ids % 7,
                         "voxel_y": voxel_ids % 5, "voxel_z": voxel_ids % 3})
    meta = pd.concat([meta, flags.drop(columns="voxel_id")], axis=1)
    meta.to_csv(betas_dir_ / f"sub-{subject:02d}_VoxelMetadata.csv", index=False)
    betas = rng.normal(size=(len(table), len(voxel_ids))).astype(np.float32)
    write_things_responses(root, subject, voxel_ids, betas, row_order=rng.permutation(len(voxel_ids)))
    _write_things_images(root, rng, list(train) + THINGS_TEST)
    _write_concepts(root)
    return ThingsFixture(root, subject, table, betas, voxel_ids, flags)


def _things_roi_flags(voxel_ids: np.ndarray) -> pd.DataFrame:
    members = {"V1": [0, 1], "V2": [2, 3], "V3": [4], "hV4": [5], "lFFA": [6, 7], "rFFA": [7, 8], "lPPA": [9],
               "rPPA": []}
    flags = pd.DataFrame({"voxel_id": voxel_ids})
    for name in THINGS_ROIS:
        flags[name] = np.isin(np.arange(len(voxel_ids)), members[name]).astype(np.int64)
    return flags


def write_things_responses(root: Path, subject: int, voxel_ids, betas: np.ndarray, row_order=None) -> Path:
    """ResponseData: rows voxels (in ``row_order``), columns voxel_id, '0'..'T-1'."""
    order = np.arange(len(voxel_ids)) if row_order is None else np.asarray(row_order)
    frame = pd.DataFrame(betas.T[order], columns=[str(t) for t in range(betas.shape[0])])
    frame.insert(0, "voxel_id", np.asarray(voxel_ids)[order])
    path = root / "betas_csv" / f"sub-{subject:02d}_ResponseData.h5"
    frame.to_hdf(path, key="ResponseData", mode="w")
    return path


def _write_things_images(root: Path, rng: np.random.Generator, stimuli: list[str]) -> None:
    for k, stimulus in enumerate(stimuli):
        folder = root / "object_images" / stimulus.rsplit("_", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = 20 + 3 * k, 30 - k
        pixels = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / stimulus, quality=95)


def _write_concepts(root: Path) -> None:
    rows = [{"Word": w, "uniqueID": c, "Definition (from WordNet, Google, or Wikipedia)": d}
            for c, (w, d) in THINGS_DEFINITIONS.items()]
    pd.DataFrame(rows).to_csv(root / "things_concepts.tsv", sep="\t", index=False)
