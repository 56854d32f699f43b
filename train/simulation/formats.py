"""Writers of the real NSD and THINGS-fMRI on-disk formats, byte-for-byte reproducible.

Every writer here produces the same bytes for the same input: MAT-file headers get a
fixed description instead of the creation time, gzip streams (NIfTI) carry no file
name and mtime 0, h5py datasets and PyTables nodes are written without object
timestamps. The formats: docs/data-formats.md.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import warnings
from pathlib import Path
from typing import Iterator

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
import tables
from PIL import Image

MAT_HEADER_BYTES = 116  # the free-text description field of a MATLAB 5 file header
# The header of the versioned raw data (data.dvc), kept byte for byte: it names the module by its
# path before train/ had subpackages (now brainldm.train.simulation.simulate).
MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, written by brainldm.train.simulate"
GZIP_LEVEL = 6
HDF5_GZIP_LEVEL = 4  # level 4 + byte shuffle: most of level 9's ratio at a fraction of its time
PANDAS_COMPLEVEL = 4  # zlib 9 is 20x slower on float tables for 3% less
NSD_PRF_LABELS = {0: "Unknown", 1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"}
NSD_STREAM_LABELS = {0: "Unknown", 1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal",
                     5: "ventral", 6: "lateral", 7: "parietal"}
NSD_GENERAL_LABELS = {0: "Unknown", 1: "nsdgeneral"}
PYTABLES_CREATORS = ("create_array", "create_carray", "create_earray", "create_table", "create_vlarray")
# Plausible behaviour for responses.tsv (NSD's continuous recognition task).
P_CORRECT = 0.8
RT_RANGE_MS = (400.0, 1500.0)
TRIAL_SECONDS = 4.0
MATLAB_DATENUM_START = 737000.0  # days; NSD stores TIME as a MATLAB datenum
SECONDS_PER_DAY = 86400.0


def write_mat(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``scipy.io.savemat`` with a fixed header (savemat embeds the creation time)."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, arrays, do_compression=False, oned_as="row")
    data = bytearray(buffer.getvalue())
    data[:MAT_HEADER_BYTES] = MAT_DESCRIPTION.ljust(MAT_HEADER_BYTES, b" ")
    path.write_bytes(bytes(data))


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz file's bytes for ``data`` (X, Y, Z[, T]) with its dtype kept, gzip mtime 0."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


def write_h5(path: Path, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
    """One gzip+shuffle compressed dataset ``name`` in a new HDF5 file, no timestamps."""
    with h5py.File(path, "w", track_order=False) as handle:
        handle.create_dataset(
            name, data=data, chunks=chunks or True, compression="gzip",
            compression_opts=HDF5_GZIP_LEVEL, shuffle=True, track_times=False,
        )


def write_ctab(path: Path, labels: dict[int, str]) -> None:
    """FreeSurfer-style colour table as NSD ships it: ``<int> <name>`` per line."""
    path.write_text("".join(f"{k} {v}\n" for k, v in sorted(labels.items())), encoding="utf-8")


def write_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    """(H, W, 3) uint8 RGB to a baseline JPEG (PIL writes no timestamps)."""
    Image.fromarray(image, mode="RGB").save(path, format="JPEG", quality=quality)


def write_json(path: Path, obj: object) -> None:
    """Compact, key-ordered JSON (COCO annotation files are compact too)."""
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def coco_captions(coco_ids: np.ndarray, texts: list[list[str]], size: int, first_annotation_id: int) -> dict:
    """COCO ``captions_*.json`` content: images (id, file_name, height, width) and annotations."""
    images, annotations = [], []
    next_id = first_annotation_id
    for coco_id, captions in zip(coco_ids.tolist(), texts):
        images.append({"id": coco_id, "file_name": f"{coco_id:012d}.jpg", "height": size, "width": size})
        for caption in captions:
            annotations.append({"image_id": coco_id, "id": next_id, "caption": caption})
            next_id += 1
    return {"info": {"description": "brainldm simulated COCO captions"}, "images": images, "annotations": annotations}


@contextlib.contextmanager
def _pytables_without_times() -> Iterator[None]:
    """Make PyTables (used by pandas.to_hdf) create nodes without modification times."""
    originals = {name: getattr(tables.File, name) for name in PYTABLES_CREATORS}

    def untimed(creator):
        @functools.wraps(creator)
        def create(*args, **kwargs):
            kwargs.setdefault("track_times", False)
            return creator(*args, **kwargs)

        return create

    for name, creator in originals.items():
        setattr(tables.File, name, untimed(creator))
    try:
        yield
    finally:
        for name, creator in originals.items():
            setattr(tables.File, name, creator)


def write_response_data(path: Path, voxel_ids: np.ndarray, values: np.ndarray) -> None:
    """THINGS ``sub-XX_ResponseData.h5``: pandas HDF key ResponseData, rows voxels.

    Args:
        voxel_ids: (V,) int64; values: (V, T) float32, one column per trial (labels 0..T-1).
    """
    frame = pd.DataFrame(values, columns=pd.RangeIndex(values.shape[1]))
    frame.insert(0, "voxel_id", voxel_ids.astype(np.int64))
    with _pytables_without_times(), warnings.catch_warnings():
        # The mixed column labels (voxel_id, 0, 1, ...) are pickled; the real files are the same.
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        frame.to_hdf(path, key="ResponseData", mode="w", complevel=PANDAS_COMPLEVEL, complib="zlib")


def nsd_stim_info(
    coco_ids: np.ndarray, coco_split: np.ndarray, crop_boxes: list[str], shared: np.ndarray,
    seen: np.ndarray, reps: np.ndarray,
) -> pd.DataFrame:
    """``nsd_stim_info_merged.csv`` table, one row per 73k image (nsdId = row, 0-based).

    Args:
        coco_ids (P,) int64; coco_split (P,) str; shared (P,) bool;
        seen (8, P) 0/1 per subject; reps (8, P, R) 1-based trial numbers, 0 = not shown.
    """
    n_pool = len(coco_ids)
    columns: dict[str, object] = {
        "cocoId": coco_ids, "cocoSplit": coco_split, "cropBox": crop_boxes,
        "loss": np.zeros(n_pool), "nsdId": np.arange(n_pool), "flagged": np.zeros(n_pool, bool),
        "BOLD5000": np.zeros(n_pool, bool), "shared1000": shared,
    }
    for s in range(seen.shape[0]):
        columns[f"subject{s + 1}"] = seen[s].astype(np.int64)
    for s in range(reps.shape[0]):
        for r in range(reps.shape[2]):
            columns[f"subject{s + 1}_rep{r}"] = reps[s, :, r].astype(np.int64)
    return pd.DataFrame(columns)


def nsd_responses(
    subject: int, session: np.ndarray, run: np.ndarray, trial_in_run: np.ndarray,
    nsd_ids: np.ndarray, list_index: np.ndarray, rng: np.random.Generator,
) -> pd.DataFrame:
    """``responses.tsv`` rows, one per trial in presentation order.

    Args: per-trial (T,) arrays: session, run, trial_in_run (1-based), nsd_ids (0-based 73k id),
    list_index (1-based index into the subject's list, i.e. the 10KID).
    Behaviour columns (old/new judgement) are plausible random values.
    """
    n = len(session)
    first = np.zeros(n, dtype=bool)
    first[np.unique(nsd_ids, return_index=True)[1]] = True
    is_old = (~first).astype(np.int64)
    correct = (rng.random(n) < P_CORRECT).astype(np.int64)
    clock = np.round(MATLAB_DATENUM_START + np.arange(n) * TRIAL_SECONDS / SECONDS_PER_DAY, 6)
    return pd.DataFrame({
        "SUBJECT": np.full(n, subject), "SESSION": session, "RUN": run, "TRIAL": trial_in_run,
        "73KID": nsd_ids + 1, "10KID": list_index, "TIME": clock,
        "ISOLD": is_old, "ISCORRECT": correct, "RT": np.round(rng.uniform(*RT_RANGE_MS, n), 1),
        "BUTTON": np.where(is_old == correct, 1, 2), "MISSINGDATA": np.zeros(n, dtype=np.int64),
    })


THINGS_ROI_COLUMNS = (
    "V1", "V2", "V3", "hV4", "VO1", "VO2", "LO1 (prf)", "LO2 (prf)", "TO1", "TO2", "V3b", "V3a",
    "lEBA", "rEBA", "lFFA", "rFFA", "lOFA", "rOFA", "lSTS", "rSTS", "lPPA", "rPPA", "lRSC", "rRSC",
    "lTOS", "rTOS", "lLOC", "rLOC",
)
GLASSER_COLUMNS = {  # a few HCP-MMP (Glasser) parcels, as newer releases add them
    "glasser-V1": ("V1",), "glasser-V2": ("V2",), "glasser-V3": ("V3",), "glasser-V4": ("hV4",),
    "glasser-FFC": ("lFFA", "rFFA"), "glasser-PHA1": ("lPPA", "rPPA"),
}
IMAGE_DEGREES = 10.0  # THINGS images subtend 10 degrees of visual angle
# THINGS gives each concept a WordNet definition; the simulated ones are written in the small
# LDM's caption vocabulary, because a word outside its tokenizer falls apart into sub-word pieces
# that its text encoder never saw in training, and c would then encode noise (a test checks this).
CONCEPT_DEFINITION = "a simple {colour} {kind} shape drawn on the image"


def noise_ceiling(test_repeats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise ceilings (percent) from repeated test trials (n_images, R, V).

    ncsnr = signal sd / noise sd; NC_n = 100 ncsnr^2 / (ncsnr^2 + 1/n) (GLMsingle's definition).
    Returns (NC for the R-trial average, NC for single trials), each (V,) float64.
    """
    noise_var = test_repeats.var(axis=1, ddof=1).mean(axis=0)
    signal_var = np.clip(test_repeats.reshape(-1, test_repeats.shape[2]).var(axis=0) - noise_var, 0, None)
    ncsnr2 = signal_var / np.where(noise_var > 0, noise_var, np.inf)
    n_rep = test_repeats.shape[1]
    return 100 * ncsnr2 / (ncsnr2 + 1 / n_rep), 100 * ncsnr2 / (ncsnr2 + 1)


def things_voxel_metadata(
    voxel_ids: np.ndarray, shape: tuple[int, ...], roi_names: np.ndarray, model, test_repeats: np.ndarray,
) -> pd.DataFrame:
    """``sub-XX_VoxelMetadata.csv``: one row per voxel of ResponseData, same order.

    Args: voxel_ids (V,) flat C-order index into ``shape`` (X, Y, Z); roi_names (V,) ROI column
    name or ""; model: the encoding VoxelModel (pRF columns); test_repeats (n_test, R, V).
    """
    x, y, z = np.unravel_index(voxel_ids, shape)
    nc_test, nc_single = noise_ceiling(test_repeats)
    retinotopic = (model.area != "") & (model.semantic_mix < 1)
    dx, dy = model.prf_x - 0.5, 0.5 - model.prf_y  # visual field: up is positive
    columns: dict[str, object] = {
        "voxel_id": voxel_ids, "subject_id": np.ones(len(voxel_ids), dtype=np.int64),
        "voxel_x": x, "voxel_y": y, "voxel_z": z,
        "nc_testset": np.round(nc_test, 4), "nc_singletrial": np.round(nc_single, 4),
        "prf-eccentricity": np.where(retinotopic, np.round(np.hypot(dx, dy) * IMAGE_DEGREES, 4), np.nan),
        "prf-polarangle": np.where(retinotopic, np.round(np.degrees(np.arctan2(dy, dx)) % 360, 4), np.nan),
        "prf-rsquared": np.where(retinotopic, np.round(1 - model.semantic_mix, 4), 0.0),
        "prf-size": np.where(retinotopic, np.round(model.prf_sigma * IMAGE_DEGREES, 4), np.nan),
    }
    for name in THINGS_ROI_COLUMNS:
        columns[name] = (roi_names == name).astype(np.int64)
    for name, members in GLASSER_COLUMNS.items():
        columns[name] = np.isin(roi_names, members).astype(np.int64)
    return pd.DataFrame(columns)


def things_stimulus_metadata(
    is_test: np.ndarray, session: np.ndarray, run: np.ndarray, stimulus: list[str]
) -> pd.DataFrame:
    """``sub-XX_StimulusMetadata.csv``: one row per trial, in ResponseData column order."""
    n = len(stimulus)
    return pd.DataFrame({
        "trial_type": np.where(is_test, "test", "train"), "session": session, "run": run,
        "subject_id": np.ones(n, dtype=np.int64), "trial_id": np.arange(n), "stimulus": stimulus,
    })


def things_concepts(concepts: list[str]) -> pd.DataFrame:
    """``things_concepts.tsv`` rows: Word, uniqueID (= concept), definition, for ``colour_kind`` concepts."""
    words = [c.replace("_", " ") for c in concepts]
    definitions = [CONCEPT_DEFINITION.format(colour=c.split("_")[0], kind=c.split("_")[1]) for c in concepts]
    return pd.DataFrame({
        "Word": words, "uniqueID": concepts, "Definition (from WordNet, Google, or Wikipedia)": definitions,
        "Wordnet ID": [f"{w}.n.01" for w in concepts],
    })


def nsd_roi_volumes(layout) -> dict[str, np.ndarray]:
    """prf-visualrois, streams and nsdgeneral (X, Y, Z) int16 volumes: -1 outside brain, 0 outside ROI."""
    names = np.array(["", *layout.names])[np.clip(layout.roi, 0, None)]
    dorsal = (~layout.inferior).astype(np.int16)
    prf = np.select(
        [names == "V1", names == "V2", names == "V3", names == "hV4"],
        [1 + dorsal, 3 + dorsal, 5 + dorsal, np.full_like(dorsal, 7)], 0,
    )
    # Stream labels: 2/3/4 mid-ventral/lateral/parietal, 5/6/7 ventral/lateral/parietal, by direction.
    stream_offset = np.array([0, 1, 2])[layout.direction]
    streams = np.select(
        [np.isin(names, ("V1", "V2", "V3")), names == "hV4", names == "mid", names == "high"],
        [1, 2, 2 + stream_offset, 5 + stream_offset], 0,
    )
    outside = layout.roi < 0
    volumes = {"prf-visualrois": prf, "streams": streams, "nsdgeneral": (layout.roi > 0).astype(np.int16)}
    return {k: np.where(outside, -1, v).astype(np.int16) for k, v in volumes.items()}


def grid_affine(grid: tuple[int, ...], voxel_mm: float) -> np.ndarray:
    """(4, 4) RAS affine of an isotropic grid centred on the origin."""
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.asarray(grid, dtype=np.float64) - 1) / 2
    return affine
