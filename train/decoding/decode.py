"""Stage ``decode``: predict the test split's targets with a fitted decoder; stage-1 metrics.

``python -m brainldm.train.decoding.decode --dataset NAME --decoder NAME`` reads
``data/prepared/<dataset>.h5`` (test split: repeats already averaged),
``models/decoders/<dataset>/<decoder>.safetensors`` and ``data/targets/<dataset>.h5``,
and writes ``results/decode/<dataset>/<decoder>.h5`` (``pred``, ``image_index``) and
``results/decode/<dataset>/<decoder>.json`` (MSE, Pearson r per sample and per
dimension, two-way identification, chance; the target's ceiling and floor). Also holds the input/target readers and
metrics that ``fit`` reuses on the validation split.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from brainldm.train.evaluation import metrics
from brainldm.train.config import config_to_json, execution_option, load_config, run_stage
from brainldm.train.decoding.decoders import Checkpoint, load_checkpoint
from brainldm.train.distributed import resolve_device
# The readers live with the prepared/targets contract; fit imports them from here too.
from brainldm.train.data.splits import check_aligned, load_inputs, load_targets  # noqa: F401
from brainldm.train.data.splits import load_perfect_predictions, split_image_index

IDENTIFICATION_CHANCE = 0.5


@dataclass(frozen=True)
class DecodeConfig:
    """``decode`` params: folders, prediction batch size, CPU threads, torch device."""

    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"
    models_dir: str = "models/decoders"
    results_dir: str = "results/decode"
    batch_size: int = 256
    threads: int = 1
    device: str = execution_option("cpu")  # cpu | cuda | auto (train/distributed.py: resolve_device)


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


def reference_rows(prepared: Path, targets: Path, target: str, real: np.ndarray, image_index: np.ndarray) -> dict:
    """Table 3's ceiling and floor for one target on the test rows ``real`` (n, ...), image_index (n,).

    ceiling: the stage-1 metrics of a perfect predictor of the target as defined (the posterior
    mean for z, c itself; splits.load_perfect_predictions). floor: the MSE of predicting every
    test image by the mean target of the unique *training* images (no test statistic; r and
    identification are undefined for a constant prediction).
    """
    ceiling = stage1_metrics(real, load_perfect_predictions(targets, target, image_index))
    train_mean = load_targets(targets, target, np.unique(split_image_index(prepared, "train"))).mean(0)
    floor = {"mse": float(np.mean((real.astype(np.float64) - train_mean) ** 2)),
             "prediction": "the mean target of the unique training images"}
    with h5py.File(targets, "r") as f:
        latent = str(f.attrs.get("latent", "sample"))  # files written before the attribute held samples
    return {"ceiling": ceiling, "floor": floor, "z_latent": latent}


def predict(checkpoint: Checkpoint, x: np.ndarray, batch_size: int, device: str | torch.device = "cpu") -> np.ndarray:
    """``x (n, V) float32 -> (n, *target_shape) float32`` in target units, computed on ``device`` (float32)."""
    if x.shape[1] != checkpoint.spec.n_voxels:
        raise ValueError(f"input has {x.shape[1]} voxels; the decoder was fitted on {checkpoint.spec.n_voxels} "
                         f"({dict(zip(checkpoint.spec.input_rois, checkpoint.spec.roi_sizes))})")
    if not np.isfinite(x).all():
        raise ValueError("input voxels contain NaN/inf; expected finite z-scores")
    model = checkpoint.predictor().to(device)  # on CPU: no-ops, the same module and tensors
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(x), batch_size), desc="predict", leave=False):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
            out.append(model(batch).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0,) + checkpoint.spec.target_shape, np.float32)


def run(config: DecodeConfig, dataset: str, decoder: str) -> dict:
    """Predict the test split with decoder ``decoder`` of ``dataset``; write the .h5 and .json; return metrics."""
    config = dataclasses.replace(config, device=resolve_device(config.device, "decode.device").type)  # "auto" resolved
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
    pred = predict(checkpoint, x, config.batch_size, config.device)
    targets = Path(config.targets_dir) / f"{dataset}.h5"
    real = load_targets(targets, spec.target, image_index)
    check_aligned(prepared, targets, spec.target)
    if real.shape[1:] != tuple(spec.target_shape):
        raise ValueError(f"targets {spec.target} have shape {real.shape[1:]} per image; the decoder predicts "
                         f"{tuple(spec.target_shape)}")
    metrics = {"dataset": dataset, "decoder": decoder, "kind": spec.kind, "target": spec.target,
               "input_rois": list(spec.input_rois), "split": "test", **stage1_metrics(real, pred),
               **reference_rows(prepared, targets, spec.target, real, image_index)}
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
    return run_stage(lambda: json.dumps(run(load_config(DecodeConfig, "decode", args.params), args.dataset,
                                               args.decoder), sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
