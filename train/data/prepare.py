"""Stage ``prepare``: native NSD / THINGS-fMRI files -> one normalised HDF5 per dataset.

Protocol (leak-free by construction, see docs/prepared_schema.md):
- test = NSD ``sharedix`` images / THINGS ``trial_type == test``; validation = a seeded
  fraction of the TRAINING images (all their trials); train = the remaining single trials;
- per-voxel z-scores within each session with mean/std of that session's train-split
  trials only (a zero std is replaced by 1);
- validation and test repeats are averaged AFTER normalisation;
- the ROI graph uses train-split responses only.

Usage: ``python -m brainldm.train.data.prepare --dataset sim-nsd [--params params.yaml]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from brainldm.train.data import roi_graph
from brainldm.train.data.splits import SPLITS
from brainldm.train.config import config_to_json, load_config, run_stage
from brainldm.runtime.atomic import atomic_path

FORMAT_VERSION = 1
SOURCES = ("nsd", "things")
AVERAGED_SESSION = -1  # session of a sample whose repeats came from several sessions


@dataclass(frozen=True)
class RoiSpec:
    """NSD: ``atlas`` (e.g. prf-visualrois) and ``labels`` (ctab names or integers);
    THINGS: ``columns`` of the voxel metadata (the ROI is their union)."""

    atlas: str | None = None
    labels: tuple[str | int, ...] = ()
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: source nsd|things, root folder, 1-based subject, ROIs, sessions
    (count of sessions 1..n, or None for all present), NSD betas format hdf5|nifti,
    image_size (square output side in pixels, LANCZOS; None keeps NSD's native size),
    NSD test_min_repeats (test = the shared images shown at least this often; None: all shown;
    see ``nsd.select_test_images``)."""

    source: str
    root: str
    subject: int
    rois: dict[str, RoiSpec]
    sessions: int | None = None
    betas_format: str | None = None  # NSD only: hdf5 | nifti
    image_size: int | None = None
    test_min_repeats: int | None = None  # NSD only


@dataclass(frozen=True)
class PrepareConfig:
    datasets: dict[str, DatasetConfig]
    val_fraction: float = 0.1
    seed: int = 0
    output_dir: str = "data/prepared"
    graph: roi_graph.GraphConfig = field(default_factory=roi_graph.GraphConfig)


@dataclass
class RawData:
    """What a loader returns: raw (un-normalised) responses and stimuli of one subject.

    betas (T, V_all) float32 raw responses; voxel_ids (V_all,) int64 sorted raw-layout
    ids; roi_columns name -> (V_roi,) int64 columns of betas; trial_image (T,) int64 row
    into images; trial_session (T,) int64 1-based; image_ids (N,) int64 native ids;
    image_names N str; image_is_test (N,) bool; images (N, H, W, 3) uint8; captions N
    lists of >= 1 str.
    """

    source: str
    subject: str
    betas: np.ndarray
    voxel_ids: np.ndarray
    roi_columns: dict[str, np.ndarray]
    trial_image: np.ndarray
    trial_session: np.ndarray
    image_ids: np.ndarray
    image_names: list[str]
    image_is_test: np.ndarray
    images: np.ndarray
    captions: list[list[str]]


@dataclass
class Split:
    """One split: image_index (n,) int64, session (n,) int64, data (n, V_all) float32 z-scores."""

    image_index: np.ndarray
    session: np.ndarray
    data: np.ndarray


@dataclass
class NormStats:
    """sessions (S,) int64; mean, std (S, V_all) float32 over train-split trials."""

    sessions: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def load_raw(ds: DatasetConfig) -> RawData:
    """Dispatch to the source's loader (imported here: the loaders import this module)."""
    for name, spec in ds.rois.items():
        wrong = (spec.columns if ds.source == "nsd" else spec.atlas or spec.labels)
        if wrong:
            expected = "atlas + labels" if ds.source == "nsd" else "columns"
            raise ValueError(f"ROI {name!r}: a {ds.source} ROI is given by {expected}, got {wrong!r}")
    if ds.test_min_repeats is not None and (ds.source != "nsd" or ds.test_min_repeats < 1):
        raise ValueError(f"test_min_repeats {ds.test_min_repeats} for a {ds.source} dataset; expected a positive "
                         f"count for NSD, or null (THINGS: every test image has its 12 repeats)")
    if ds.image_size is not None and ds.image_size < 1:
        raise ValueError(f"image_size {ds.image_size}; expected a positive pixel count or null")
    if ds.source == "nsd":
        from brainldm.train.data import nsd

        return nsd.load(ds)
    if ds.source == "things":
        from brainldm.train.data import things

        return things.load(ds)
    raise ValueError(f"dataset source {ds.source!r}; expected one of {list(SOURCES)}")


def assign_images(image_is_test: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of validation images among the TRAINING images.

    Returns (val_rows, train_rows), sorted int64 rows into the image list; test rows
    are never candidates.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction}; expected 0 <= val_fraction < 1")
    candidates = np.flatnonzero(~image_is_test)
    n_val = int(round(val_fraction * len(candidates)))
    if len(candidates) - n_val < 1:
        raise ValueError(f"{len(candidates)} training images leave none for training after validation")
    chosen = np.random.default_rng(seed).permutation(len(candidates))[:n_val]
    val_rows = np.sort(candidates[chosen])
    return val_rows.astype(np.int64), np.setdiff1d(candidates, val_rows).astype(np.int64)


def session_stats(betas: np.ndarray, trial_session: np.ndarray, train_trials: np.ndarray) -> NormStats:
    """Per-session, per-voxel mean/std over the train-split trials only (std 0 -> 1)."""
    sessions = np.unique(trial_session)
    mean = np.zeros((len(sessions), betas.shape[1]), np.float32)
    std = np.ones_like(mean)
    train_sessions = trial_session[train_trials]
    for k, session in enumerate(sessions):
        rows = train_trials[train_sessions == session]
        if rows.size == 0:
            raise ValueError(f"session {session} has no training trials; cannot fit its normalisation")
        block = betas[rows].astype(np.float64)
        mean[k] = block.mean(axis=0)
        sd = block.std(axis=0)
        std[k] = np.where(sd > 0, sd, 1.0)
    return NormStats(sessions.astype(np.int64), mean, std)


def normalise(betas: np.ndarray, trial_session: np.ndarray, stats: NormStats) -> np.ndarray:
    """(T, V) float32 z-scores, each trial with its own session's statistics."""
    out = np.empty(betas.shape, np.float32)
    for k, session in enumerate(stats.sessions):  # per session: no (T, V) copies of the statistics
        rows = np.flatnonzero(trial_session == session)
        out[rows] = (betas[rows] - stats.mean[k]) / stats.std[k]
    return out


def average_images(z: np.ndarray, raw: RawData, image_rows: np.ndarray, name: str) -> Split:
    """Average all trials of each image (after normalisation): one sample per image row."""
    data = np.zeros((len(image_rows), z.shape[1]), np.float32)
    session = np.empty(len(image_rows), np.int64)
    order = np.argsort(raw.trial_image, kind="stable")
    bounds = np.searchsorted(raw.trial_image[order], [image_rows, image_rows + 1])
    for k in tqdm(range(len(image_rows)), desc=f"average {name}", leave=False):
        trials = order[bounds[0, k] : bounds[1, k]]
        data[k] = z[trials].astype(np.float64).mean(axis=0)
        sessions = np.unique(raw.trial_session[trials])
        session[k] = sessions[0] if len(sessions) == 1 else AVERAGED_SESSION
    return Split(image_rows.astype(np.int64), session, data)


def build_splits(raw: RawData, val_fraction: float, seed: int) -> tuple[dict[str, Split], NormStats]:
    """Train (single trials), val and test (repeats averaged) splits and the train-only stats."""
    val_rows, train_rows = assign_images(raw.image_is_test, val_fraction, seed)
    train_trials = np.flatnonzero(np.isin(raw.trial_image, train_rows))
    stats = session_stats(raw.betas, raw.trial_session, train_trials)
    z = normalise(raw.betas, raw.trial_session, stats)
    splits = {
        "train": Split(raw.trial_image[train_trials], raw.trial_session[train_trials], z[train_trials]),
        "val": average_images(z, raw, val_rows, "val"),
        "test": average_images(z, raw, np.flatnonzero(raw.image_is_test), "test"),
    }
    return splits, stats


def split_rois(split: Split, raw: RawData) -> dict[str, np.ndarray]:
    """ROI name -> (n, V_roi) float32 of one split."""
    return {name: split.data[:, cols] for name, cols in raw.roi_columns.items()}


def validate_raw(raw: RawData) -> None:
    """Consistency checks a loader's output must pass before anything is written."""
    n_images = len(raw.image_ids)
    if len(np.unique(raw.image_ids)) != n_images:
        raise ValueError(f"{raw.source} {raw.subject}: duplicated image ids; expected one row per image")
    if not (len(raw.images) == len(raw.captions) == len(raw.image_names) == len(raw.image_is_test) == n_images):
        raise ValueError(f"{raw.source} {raw.subject}: images, captions, names and test flags disagree in length")
    if any(len(c) == 0 for c in raw.captions):
        raise ValueError(f"{raw.source} {raw.subject}: an image has no caption; expected >= 1 per image")
    if not (raw.betas.shape[0] == len(raw.trial_image) == len(raw.trial_session)):
        raise ValueError(f"{raw.source} {raw.subject}: betas rows and trial tables disagree")
    empty = [name for name, cols in raw.roi_columns.items() if len(cols) == 0]
    if empty:
        raise ValueError(f"{raw.source} {raw.subject}: ROI(s) {empty} select zero voxels")
    if not np.all(np.isfinite(raw.betas)):
        raise ValueError(f"{raw.source} {raw.subject}: non-finite betas")


Prepared = tuple[RawData, dict[str, Split], NormStats, roi_graph.RoiGraph]


def prepare(ds: DatasetConfig, config: PrepareConfig) -> Prepared:
    """Load, split, normalise and build the graph of one dataset (nothing is written)."""
    roi_graph.validate_nodes(config.graph.nodes, list(ds.rois))
    raw = load_raw(ds)
    validate_raw(raw)
    splits, stats = build_splits(raw, config.val_fraction, config.seed)
    graph = roi_graph.build_graph(split_rois(splits["train"], raw), config.graph)
    return raw, splits, stats, graph


def write_prepared(path: Path, name: str, config: PrepareConfig, result: Prepared) -> None:
    """Write the prepared file (docs/prepared_schema.md) atomically."""
    raw, splits, stats, graph = result
    text = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(format_version=FORMAT_VERSION, dataset=name, subject=raw.subject, source=raw.source)
        f.attrs["config"] = config_to_json(config)
        f.create_dataset("images", data=raw.images, dtype=np.uint8)
        f.create_dataset("image_ids", data=raw.image_ids.astype(np.int64))
        f.create_dataset("image_names", data=np.array(raw.image_names, dtype=object), dtype=text)
        f.create_dataset("captions", data=np.array([json.dumps(c) for c in raw.captions], dtype=object), dtype=text)
        for split_name, split in splits.items():
            group = f.create_group(f"splits/{split_name}")
            group["image_index"] = split.image_index.astype(np.int64)
            group["session"] = split.session.astype(np.int64)
            for roi, data in split_rois(split, raw).items():
                group.create_dataset(f"rois/{roi}", data=data.astype(np.float32))
        for roi, cols in raw.roi_columns.items():
            f[f"rois/{roi}/voxel_ids"] = raw.voxel_ids[cols].astype(np.int64)
            f[f"rois/{roi}/columns"] = cols.astype(np.int64)
        f["norm/sessions"], f["norm/mean"], f["norm/std"] = stats.sessions, stats.mean, stats.std
        # Raw test trials let the runtime (and the parity stage) start where a user starts: from betas.
        test_trials = np.flatnonzero(raw.image_is_test[raw.trial_image])
        f["raw_test/betas"] = raw.betas[test_trials].astype(np.float32)
        f["raw_test/session"] = raw.trial_session[test_trials].astype(np.int64)
        f["raw_test/image_index"] = raw.trial_image[test_trials].astype(np.int64)
        f["norm/voxel_ids"] = raw.voxel_ids.astype(np.int64)
        f["graph/edge_index"] = graph.edge_index.astype(np.int64)
        f["graph/edge_weight"] = graph.edge_weight.astype(np.float32)
        f.create_dataset("graph/node_rois", data=json.dumps([list(n) for n in graph.node_rois]), dtype=text)
        f["graph"].attrs["pad_length"] = int(graph.pad_length)


def run(cfg: PrepareConfig, dataset: str) -> Path:
    """Prepare dataset ``dataset`` and write ``<output_dir>/<dataset>.h5``; returns the path."""
    if dataset not in cfg.datasets:
        raise ValueError(f"--dataset {dataset!r} not in prepare.datasets; configured: {sorted(cfg.datasets)}")
    path = Path(cfg.output_dir) / f"{dataset}.h5"
    write_prepared(path, dataset, cfg, prepare(cfg.datasets[dataset], cfg))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="dataset name in params.yaml prepare.datasets")
    parser.add_argument("--params", default="params.yaml", help="params file (section 'prepare')")
    args = parser.parse_args(argv)
    return run_stage(lambda: f"wrote {run(load_config(PrepareConfig, 'prepare', args.params), args.dataset)}")


if __name__ == "__main__":
    sys.exit(main())
