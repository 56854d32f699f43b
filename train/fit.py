"""Stage ``fit``: train one stage-1 decoder (ridge, CNN, VAE or GCN) on the training split.

``python -m brainldm.train.fit --dataset NAME --decoder NAME`` reads
``data/prepared/<dataset>.h5`` and ``data/targets/<dataset>.h5`` and writes
``models/decoders/<dataset>/<decoder>.safetensors`` (see ``decoders.save_checkpoint``),
``results/fit/<dataset>/<decoder>/loss.csv`` (per-epoch train/val loss, DVC plot) and
``results/fit/<dataset>/<decoder>/metrics.json`` (validation metrics).

No test data is read: targets are standardised per dimension with training
statistics, early stopping watches the validation split, ridge picks alphas by
cross-validation on training trials grouped by image.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
import torch.utils.deterministic
from tqdm import tqdm

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.config import ConfigError, config_to_dict, load_config, run_stage
from brainldm.train.decode import check_aligned, load_inputs, load_targets, stage1_metrics
from brainldm.train.decoders import (DECODER_KINDS, DecoderSpec, VaeDecoder, build_decoder, save_checkpoint,
                                     vae_loss)

MIN_TRAIN_BATCH = 2  # BatchNorm needs > 1 sample per batch in training mode
DEFAULT_ALPHAS = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5)
RIDGE_PREDICT_BATCH = 1024
RIDGE_FOLD_TOL = 1e-4  # folded float32 linear layer vs RidgeModel.predict


@dataclass(frozen=True)
class CnnArch:
    """CnnDecoder sizes (see decoders.CnnDecoder)."""

    channels: int = 16
    n_blocks: int = 2
    kernel_size: int = 7
    stem_stride: int = 4
    pool: int = 4
    hidden: tuple[int, ...] = (512, 512)
    dropout: float = 0.1


@dataclass(frozen=True)
class VaeArch:
    """VaeDecoder sizes and loss weights: loss = MSE + beta * KL + gamma * fMRI reconstruction."""

    hidden: int = 512
    recon_hidden: int = 512
    dropout: float = 0.1
    beta: float = 1e-3
    gamma: float = 0.1


@dataclass(frozen=True)
class GcnArch:
    """GcnDecoder sizes; pooling over nodes: mean | flatten."""

    hidden: int = 64
    cheb_k: int = 2
    pooling: str = "flatten"
    head_hidden: int = 256
    dropout: float = 0.1


@dataclass(frozen=True)
class RidgeSettings:
    """Ridge baseline: alphas searched by n_folds-fold CV (folds grouped by image), per target."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    n_folds: int = 5
    target_chunk: int = 1000


@dataclass(frozen=True)
class OptimSettings:
    """Adam, minibatches, early stopping on the validation loss (never test)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 40
    patience: int = 5


@dataclass(frozen=True)
class DecoderConfig:
    """One decoder entry: kind (ridge|cnn|vae|gcn), target (z|c), input ROIs (concatenated in this
    order); the sub-section of its own kind (and only that one); the networks' seed and optimiser."""

    kind: str
    target: str
    input_rois: tuple[str, ...]
    seed: int | None = None  # networks only: ridge is deterministic and not iterative
    optim: OptimSettings | None = None
    cnn: CnnArch | None = None
    vae: VaeArch | None = None
    gcn: GcnArch | None = None
    ridge: RidgeSettings | None = None


@dataclass(frozen=True)
class FitConfig:
    """``fit`` params: folders, CPU threads, target-std floor, and the named decoders."""

    decoders: dict[str, DecoderConfig]
    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"
    models_dir: str = "models/decoders"
    results_dir: str = "results/fit"
    threads: int = 1
    std_floor: float = 1e-6



def decoder_config(config: FitConfig, name: str) -> DecoderConfig:
    """The validated entry ``name`` (clear ConfigError for unknown names, kinds, targets, stray sections)."""
    if name not in config.decoders:
        raise ConfigError(f"fit.decoders: unknown decoder {name!r}; configured: {sorted(config.decoders)}")
    entry = config.decoders[name]
    if entry.kind not in DECODER_KINDS:
        raise ConfigError(f"fit.decoders.{name}.kind: {entry.kind!r}; expected one of {DECODER_KINDS}")
    if entry.target not in ("z", "c"):
        raise ConfigError(f"fit.decoders.{name}.target: {entry.target!r}; expected 'z' or 'c'")
    network_keys = ("seed", "optim")
    own = (entry.kind, *network_keys) if entry.kind != "ridge" else (entry.kind,)
    stray = [k for k in (*DECODER_KINDS, *network_keys) if k not in own and getattr(entry, k) is not None]
    if stray:
        raise ConfigError(f"fit.decoders.{name}: section(s) {stray} do not apply to kind {entry.kind!r}")
    missing = [k for k in own if getattr(entry, k) is None]
    if missing:
        raise ConfigError(f"fit.decoders.{name}: missing {missing} (needed by kind {entry.kind!r})")
    if not entry.input_rois:
        raise ConfigError(f"fit.decoders.{name}.input_rois: expected at least one ROI")
    return entry


def _arch(entry: DecoderConfig) -> dict:
    return config_to_dict(getattr(entry, entry.kind))


def read_graph(prepared: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[str, ...], ...]]:
    """``edge_index (2, E) int64``, ``edge_weight (E,) float32`` and node ROI lists of the prepared file."""
    with h5py.File(prepared, "r") as f:
        if "graph" not in f:
            raise ValueError(f"{prepared}: no 'graph' group; the gcn decoder needs the ROI graph")
        g = f["graph"]
        node_rois = tuple(tuple(n) for n in json.loads(g["node_rois"][()]))
        return (torch.from_numpy(np.asarray(g["edge_index"], dtype=np.int64)),
                torch.from_numpy(np.asarray(g["edge_weight"], dtype=np.float32)), node_rois)


@dataclass
class FitData:
    """Standardised training/validation arrays: x (n, V) float32, y (n, K) float32."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    train_groups: np.ndarray
    mean: torch.Tensor
    std: torch.Tensor
    spec: DecoderSpec
    graph: tuple[torch.Tensor, torch.Tensor] | None


def load_fit_data(config: FitConfig, dataset: str, entry: DecoderConfig) -> FitData:
    """Read train/val inputs and targets; standardise targets with TRAINING mean/std per dimension."""
    prepared = Path(config.prepared_dir) / f"{dataset}.h5"
    targets = Path(config.targets_dir) / f"{dataset}.h5"
    x_tr, idx_tr, sizes = load_inputs(prepared, "train", entry.input_rois)
    x_va, idx_va, _ = load_inputs(prepared, "val", entry.input_rois)
    y_tr = load_targets(targets, entry.target, idx_tr)
    y_va = load_targets(targets, entry.target, idx_va)
    check_aligned(prepared, targets, entry.target)
    if len(x_va) < 2:
        raise ValueError(f"{prepared}: the val split has {len(x_va)} samples; early stopping needs >= 2")
    graph, node_rois = None, None
    if entry.kind == "gcn":
        edge_index, edge_weight, node_rois = read_graph(prepared)
        graph = (edge_index, edge_weight)
    spec = DecoderSpec(kind=entry.kind, target=entry.target, target_shape=tuple(y_tr.shape[1:]),
                       input_rois=tuple(entry.input_rois), roi_sizes=tuple(sizes), arch=_arch(entry),
                       node_rois=node_rois)
    y_tr, y_va = y_tr.reshape(len(y_tr), -1), y_va.reshape(len(y_va), -1)
    # statistics of training targets only (a test or val image never contributes)
    mean = y_tr.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = np.maximum(y_tr.std(axis=0, dtype=np.float64), config.std_floor).astype(np.float32)
    as_t = torch.from_numpy
    return FitData(as_t(x_tr), as_t((y_tr - mean) / std), as_t(x_va), as_t((y_va - mean) / std), idx_tr,
                   as_t(mean), as_t(std), spec, graph)


def _predict_std(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _train_epoch(model, optimiser, data: FitData, batch_size: int, generator: torch.Generator, arch: dict) -> float:
    """One pass over shuffled training minibatches; returns the mean training objective."""
    model.train()
    order = torch.randperm(len(data.x_train), generator=generator)
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < MIN_TRAIN_BATCH:
            continue
        x, y = data.x_train[batch], data.y_train[batch]
        if isinstance(model, VaeDecoder):
            loss = vae_loss(model, x, y, arch["beta"], arch["gamma"])
        else:
            loss = torch.nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total, seen = total + loss.item() * len(batch), seen + len(batch)
    return total / max(seen, 1)


def train_network(data: FitData, entry: DecoderConfig) -> tuple[torch.nn.Module, list[dict]]:
    """Adam + early stopping on validation MSE (standardised targets); returns the best model and history."""
    torch.manual_seed(entry.seed)
    generator = torch.Generator().manual_seed(entry.seed)
    model = build_decoder(data.spec, *(data.graph or ()))
    opt = entry.optim
    # fused: its kernel's square root gives the same bits on every processor compared; the
    # per-tensor path's torch.sqrt does not (docs/reproducibility.md)
    optimiser = torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay, fused=True)
    best_loss, best_state, since_best, history = float("inf"), copy.deepcopy(model.state_dict()), 0, []
    for epoch in (bar := tqdm(range(1, opt.max_epochs + 1), desc=f"fit {data.spec.kind}")):
        train_loss = _train_epoch(model, optimiser, data, opt.batch_size, generator, data.spec.arch)
        val_loss = float(torch.mean((_predict_std(model, data.x_val, opt.batch_size) - data.y_val) ** 2))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best_loss:
            best_loss, best_state, since_best = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= opt.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), history


def train_ridge(data: FitData, entry: DecoderConfig) -> tuple[torch.nn.Module, list[dict]]:
    """Ridge CV (one alpha per target, folds grouped by image) stored as an exact LinearDecoder."""
    from brainldm.train.ridge import fit_ridge_cv  # only the ridge kind needs it

    settings = entry.ridge
    ridge = fit_ridge_cv(data.x_train.numpy(), data.y_train.numpy(), list(settings.alphas),
                         n_folds=settings.n_folds, groups=data.train_groups, target_chunk=settings.target_chunk)
    # fold the voxel standardisation in: y = ((x - m) / s) @ coef + b = x @ (coef / s) + (b - (m / s) @ coef)
    coef = ridge.coef.astype(np.float64)
    weight = coef / ridge.x_std.astype(np.float64)[:, None]
    bias = ridge.intercept - (ridge.x_mean / ridge.x_std).astype(np.float64) @ coef
    model = build_decoder(data.spec)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(weight.T))
        model.linear.bias.copy_(torch.from_numpy(bias))
    expected = ridge.predict(data.x_val.numpy())
    got = _predict_std(model, data.x_val, RIDGE_PREDICT_BATCH).numpy()
    if not np.allclose(got, expected, rtol=RIDGE_FOLD_TOL, atol=RIDGE_FOLD_TOL * (np.abs(expected).max() + 1)):
        raise RuntimeError("ridge: the folded linear decoder does not reproduce RidgeModel.predict")
    losses = {k: float(torch.mean((_predict_std(model, x, RIDGE_PREDICT_BATCH) - y) ** 2))
              for k, x, y in (("train_loss", data.x_train, data.y_train), ("val_loss", data.x_val, data.y_val))}
    return model.eval(), [{"epoch": 0, **losses}]


def fit(config: FitConfig, dataset: str, decoder: str) -> dict:
    """Fit decoder ``decoder`` on ``dataset``; write checkpoint, loss.csv, metrics.json; return val metrics."""
    entry = decoder_config(config, decoder)
    with _deterministic(config.threads):
        return _fit(config, dataset, decoder, entry)


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Fixed CPU threads and deterministic kernels while fitting; the caller's settings are restored."""
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # filling every new tensor with NaN costs ~15 % of a CNN step; no kernel here reads uninitialised memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


# Validation rows per forward pass of a ridge model (it has no optimiser batch size).
RIDGE_PREDICT_BATCH = 64


def _fit(config: FitConfig, dataset: str, decoder: str, entry: DecoderConfig) -> dict:
    started = time.perf_counter()
    # 1. data, standardised with training statistics
    data = load_fit_data(config, dataset, entry)
    # 2. train (early stopping on val) or ridge CV
    model, history = (train_ridge if entry.kind == "ridge" else train_network)(data, entry)
    # 3. validation metrics in target units
    batch = entry.optim.batch_size if entry.optim else RIDGE_PREDICT_BATCH
    pred = _predict_std(model, data.x_val, batch) * data.std + data.mean
    real = data.y_val * data.std + data.mean
    best = min(history, key=lambda h: h["val_loss"])
    metrics = {"dataset": dataset, "decoder": decoder, "kind": entry.kind, "target": entry.target,
               "input_rois": list(entry.input_rois), "split": "val", "best_epoch": best["epoch"],
               "epochs_run": len(history), **stage1_metrics(real.numpy(), pred.numpy())}
    # 4. outputs, atomically
    # only this decoder's entry: editing another decoder's params must not change this checkpoint
    shared = {k: v for k, v in config_to_dict(config).items() if k != "decoders"}
    resolved = json.dumps({"dataset": dataset, "decoder": decoder, **shared, "entry": config_to_dict(entry)},
                          sort_keys=True)
    save_checkpoint(Path(config.models_dir) / dataset / f"{decoder}.safetensors", data.spec, model, data.mean,
                    data.std, resolved)
    out = Path(config.results_dir) / dataset / decoder
    rows = ["epoch,train_loss,val_loss"] + [f"{h['epoch']},{h['train_loss']:.8g},{h['val_loss']:.8g}" for h in history]
    write_text_atomic(out / "loss.csv", "\n".join(rows) + "\n")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"fit {dataset}/{decoder}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--decoder", required=True)
    args = parser.parse_args(argv)
    return run_stage(lambda: json.dumps(fit(load_config(FitConfig, "fit", args.params), args.dataset,
                                            args.decoder), sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
