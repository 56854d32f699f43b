"""Stage ``decode``: predict the test split's targets with a fitted decoder; stage-1 metrics.

``python -m brainldm.train.decode --dataset NAME --decoder NAME`` reads
``data/prepared/<dataset>.h5`` (test split: repeats already averaged),
``models/decoders/<dataset>/<decoder>.safetensors`` and ``data/targets/<dataset>.h5``,
and writes ``results/decode/<dataset>/<decoder>.h5`` (``pred``, ``image_index``) and
``results/decode/<dataset>/<decoder>.json`` (MSE, Pearson r per sample and per
dimension, two-way identification, chance). Also holds the input/target readers and
metrics that ``fit`` reuses on the validation split.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.train import metrics
from brainldm.train.config import config_to_json, load_config, run_stage
from brainldm.train.decoders import Checkpoint, load_checkpoint

SPLITS = ("train", "val", "test")
TARGET_KINDS = ("z", "c")
IDENTIFICATION_CHANCE = 0.5


@dataclass(frozen=True)
class DecodeConfig:
    """``decode`` params: folders, prediction batch size, CPU threads."""

    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"
    models_dir: str = "models/decoders"
    results_dir: str = "results/decode"
    batch_size: int = 256
    threads: int = 1


def load_inputs(prepared: str | Path, split: str, rois: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Voxels of ``rois`` concatenated in that order for one split.

    Returns ``x (n, V) float32`` (z-scored), ``image_index (n,) int64`` (rows of
    ``images``) and the voxel count of each ROI. Raises on a missing file, unknown
    split or ROI, or non-finite values.
    """
    prepared = Path(prepared)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")
    if not prepared.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {prepared} (run the prepare stage first)")
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
    targets = Path(targets)
    if target not in TARGET_KINDS:
        raise ValueError(f"target {target!r} unknown; expected one of {TARGET_KINDS}")
    if not targets.is_file():
        raise FileNotFoundError(f"targets file not found: {targets} (run the targets stage first)")
    with h5py.File(targets, "r") as f:
        if target not in f:
            raise ValueError(f"{targets}: no dataset {target!r}; found {sorted(f.keys())}")
        ds = f[target]
        expected_ndim = 4 if target == "z" else 3
        if ds.ndim != expected_ndim:
            raise ValueError(f"{targets}: {target} has shape {ds.shape}; expected "
                             f"{'(N, C, h, w)' if target == 'z' else '(N, T, D)'}")
        if len(image_index) and (image_index.min() < 0 or image_index.max() >= ds.shape[0]):
            raise ValueError(f"{targets}: {target} has {ds.shape[0]} rows but image_index reaches "
                             f"{int(image_index.max())}; rows must align with the prepared file's images")
        # h5py fancy indexing needs increasing unique rows
        rows, inverse = np.unique(image_index, return_inverse=True)
        values = np.asarray(ds[rows], dtype=np.float32)[inverse]
    if not np.isfinite(values).all():
        raise ValueError(f"{targets}: {target} contains NaN/inf in the requested rows")
    return values


def stage1_metrics(real: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Stage-1 metrics of ``pred`` against ``real`` (both ``(n, ...)``, flattened per sample).

    mse; pearson_sample (mean over samples of r across feature dims); pearson_dim
    (mean over dims of r across samples, constant dims skipped); identification
    (two-way, in the target space) and its chance level.
    """
    real = real.reshape(len(real), -1).astype(np.float64)
    pred = pred.reshape(len(pred), -1).astype(np.float64)
    if real.shape != pred.shape or len(real) < 2:
        raise ValueError(f"metrics need matching (n >= 2, K) arrays, got {real.shape} and {pred.shape}")
    return {
        "n": int(len(real)),
        "n_dims": int(real.shape[1]),
        "mse": float(np.mean((pred - real) ** 2)),
        "pearson_sample": float(np.nanmean(metrics.per_sample_pearson(real, pred))),
        "pearson_dim": float(np.nanmean(metrics.per_dimension_pearson(real, pred))),
        "identification": float(metrics.two_way_identification(real, pred).mean()),
        "identification_chance": IDENTIFICATION_CHANCE,
    }


def predict(checkpoint: Checkpoint, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``x (n, V) float32 -> (n, *target_shape) float32`` in target units."""
    if x.shape[1] != checkpoint.spec.n_voxels:
        raise ValueError(f"input has {x.shape[1]} voxels; the decoder was fitted on {checkpoint.spec.n_voxels} "
                         f"({dict(zip(checkpoint.spec.input_rois, checkpoint.spec.roi_sizes))})")
    if not np.isfinite(x).all():
        raise ValueError("input voxels contain NaN/inf; expected finite z-scores")
    model = checkpoint.predictor()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(x), batch_size), desc="predict", leave=False):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0,) + checkpoint.spec.target_shape, np.float32)


def decode(config: DecodeConfig, dataset: str, decoder: str) -> dict:
    """Predict the test split with decoder ``decoder`` of ``dataset``; write the .h5 and .json; return metrics."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _decode(config, dataset, decoder)
    finally:
        torch.set_num_threads(previous_threads)


def _decode(config: DecodeConfig, dataset: str, decoder: str) -> dict:
    prepared = Path(config.prepared_dir) / f"{dataset}.h5"
    # 1. the fitted decoder and its input voxels
    checkpoint = load_checkpoint(Path(config.models_dir) / dataset / f"{decoder}.safetensors")
    spec = checkpoint.spec
    x, image_index, sizes = load_inputs(prepared, "test", spec.input_rois)
    if tuple(sizes) != tuple(spec.roi_sizes):
        raise ValueError(f"{prepared}: ROI voxel counts {dict(zip(spec.input_rois, sizes))} differ from the "
                         f"fitted decoder's {dict(zip(spec.input_rois, spec.roi_sizes))}")
    # 2. predict and compare with the ground truth
    pred = predict(checkpoint, x, config.batch_size)
    targets = Path(config.targets_dir) / f"{dataset}.h5"
    real = load_targets(targets, spec.target, image_index)
    check_aligned(prepared, targets, spec.target)
    if real.shape[1:] != tuple(spec.target_shape):
        raise ValueError(f"targets {spec.target} have shape {real.shape[1:]} per image; the decoder predicts "
                         f"{tuple(spec.target_shape)}")
    metrics = {"dataset": dataset, "decoder": decoder, "kind": spec.kind, "target": spec.target,
               "input_rois": list(spec.input_rois), "split": "test", **stage1_metrics(real, pred)}
    # 3. outputs, atomically
    out_dir = Path(config.results_dir) / dataset
    with atomic_path(out_dir / f"{decoder}.h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("pred", data=pred)
        f.create_dataset("image_index", data=image_index)
        f.attrs["config"] = config_to_json(config)
        f.attrs["decoder_spec"] = spec.to_json()
        f.attrs["fit_config"] = json.dumps(checkpoint.config, sort_keys=True)
    write_text_atomic(out_dir / f"{decoder}.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--decoder", required=True)
    args = parser.parse_args(argv)
    return run_stage(lambda: json.dumps(decode(load_config(DecodeConfig, "decode", args.params), args.dataset,
                                               args.decoder), sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
