"""Stage ``fit``: train one stage-1 decoder (ridge, CNN, VAE or GCN) on the training split.

``python -m brainldm.train.decoding.fit --dataset NAME --decoder NAME`` reads
``data/prepared/<dataset>.h5`` and ``data/targets/<dataset>.h5`` and writes
``models/decoders/<dataset>/<decoder>.safetensors`` (see ``decoders.save_checkpoint``),
``results/fit/<dataset>/<decoder>/loss.csv`` (per-epoch train/val loss, DVC plot) and
``results/fit/<dataset>/<decoder>/metrics.json`` (validation metrics).
Under ``torchrun --nproc_per_node N`` the networks train with DDP (train/distributed.py,
docs/scale-out-training.md) and rank 0 alone writes these files.

No test data is read: targets are standardised per dimension with training
statistics, early stopping watches the validation split, ridge picks alphas by
cross-validation on training trials grouped by image.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
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
from brainldm.train import distributed
from brainldm.train.config import config_to_dict, config_to_record, load_config, run_stage
from brainldm.train.decoding.decode import check_aligned, load_inputs, load_targets, stage1_metrics
from brainldm.train.decoding.decoders import DecoderSpec, VaeDecoder, build_decoder, save_checkpoint, vae_loss
from brainldm.train.decoding.fit_config import DecoderConfig, FitConfig, decoder_config

MIN_TRAIN_BATCH = 2  # BatchNorm needs > 1 sample per batch in training mode
RIDGE_FOLD_TOL = 1e-4  # folded float32 linear layer vs RidgeModel.predict


def decoder_arch(entry: DecoderConfig) -> dict:
    """The constructor sizes (and, for vae, loss weights) of the entry's own kind, as a dict."""
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
                       input_rois=tuple(entry.input_rois), roi_sizes=tuple(sizes), arch=decoder_arch(entry),
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


class Objective(torch.nn.Module):
    """``(x (B, V), y (B, K)) -> scalar`` training loss of ``decoder`` (VAE: ``vae_loss``, else MSE);
    a module so that DDP's forward covers every parameter the loss uses (the VAE's fMRI decoder too)."""

    def __init__(self, decoder: torch.nn.Module, arch: dict):
        super().__init__()
        self.decoder, self.arch = decoder, arch

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.decoder, VaeDecoder):
            return vae_loss(self.decoder, x, y, self.arch["beta"], self.arch["gamma"])
        return torch.nn.functional.mse_loss(self.decoder(x), y)


def _train_epoch(objective, optimiser, data: FitData, batch_size: int, generator: torch.Generator) -> float:
    """One pass over shuffled training minibatches; returns the mean training objective (over all
    ranks under DDP: each rank trains on its shard of every global minibatch)."""
    objective.train()
    order = torch.randperm(len(data.x_train), generator=generator)
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        # the smallest shard decides, so every rank skips the same batches (BatchNorm needs 2 rows)
        if len(batch) // distributed.world_size() < MIN_TRAIN_BATCH:
            continue
        batch = distributed.shard(batch)
        loss = objective(data.x_train[batch], data.y_train[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total, seen = total + loss.item() * len(batch), seen + len(batch)
    total, seen = distributed.sum_across([total, seen])
    return total / max(seen, 1)


def _val_loss(model: torch.nn.Module, data: FitData, batch_size: int) -> float:
    """Validation MSE of the standardised targets; under DDP each rank scores its shard of the rows
    and the squared-error sums are all-reduced (the same value on every rank)."""
    if distributed.world_size() == 1:
        return float(torch.mean((_predict_std(model, data.x_val, batch_size) - data.y_val) ** 2))
    rows = distributed.shard(torch.arange(len(data.x_val)))
    err = (_predict_std(model, data.x_val[rows], batch_size) - data.y_val[rows]) ** 2
    sse, count = distributed.sum_across([float(err.double().sum()), err.numel()])
    return sse / count


def train_network(data: FitData, entry: DecoderConfig,
                  device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, list[dict]]:
    """Adam + early stopping on validation MSE (standardised targets); returns the best model (on the
    CPU) and history. Under DDP every rank holds the same model and history."""
    torch.manual_seed(entry.seed)
    generator = torch.Generator().manual_seed(entry.seed)
    model = build_decoder(data.spec, *(data.graph or ())).to(device)
    if distributed.rank():  # other ranks draw their own dropout / VAE noise; rank 0 keeps one process's
        torch.manual_seed(entry.seed + distributed.rank())
    moved = {k: getattr(data, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val")}  # no-op on the CPU
    data = dataclasses.replace(data, **moved)
    objective, opt = distributed.wrap(Objective(model, data.spec.arch), device), entry.optim
    # fused: its kernel's square root gives the same bits on every processor compared; the
    # per-tensor path's torch.sqrt does not (docs/reproducibility.md)
    optimiser = torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay, fused=True)
    best_loss, best_state, since_best, history = float("inf"), copy.deepcopy(model.state_dict()), 0, []
    bar = tqdm(range(1, opt.max_epochs + 1), desc=f"fit {data.spec.kind}", disable=not distributed.is_main())
    for epoch in bar:
        train_loss = _train_epoch(objective, optimiser, data, opt.batch_size, generator)
        distributed.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, the ones it saves
        val_loss = _val_loss(model, data, opt.batch_size)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        stop = False
        if val_loss < best_loss:
            best_loss, best_state, since_best = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            stop = since_best >= opt.patience
        if distributed.rank0_decides(stop):  # no rank may leave the loop alone (DDP would hang)
            break
    model.load_state_dict(best_state)
    return model.cpu().eval(), history


def train_ridge(data: FitData, entry: DecoderConfig) -> tuple[torch.nn.Module, list[dict]]:
    """Ridge CV (one alpha per target, folds grouped by image) stored as an exact LinearDecoder."""
    from brainldm.train.decoding.ridge import fit_ridge_cv  # only the ridge kind needs it

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


def run(config: FitConfig, dataset: str, decoder: str) -> dict:
    """Fit decoder ``decoder`` on ``dataset``; write checkpoint, loss.csv, metrics.json; return val metrics
    (rank 0's on every rank under torchrun)."""
    entry = decoder_config(config, decoder)
    device = distributed.resolve_device(config.device, "fit.device")
    config = dataclasses.replace(config, device=device.type)  # "auto" resolved: the record says where it ran
    if entry.kind == "ridge" and distributed.launched_world_size() > 1:
        raise ValueError(f"fit.decoders.{decoder}: ridge is solved in closed form, not trained with DDP; "
                         "run it without torchrun")
    distributed.join_process_group(device)
    with deterministic(config.threads, device):
        return _fit(config, dataset, decoder, entry, device)


@contextlib.contextmanager
def deterministic(threads: int, device: torch.device) -> Iterator[None]:
    """Fixed CPU threads and deterministic kernels while fitting; the caller's settings are restored."""
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace (read when its handle is created); a
        # CUDA kernel without a deterministic variant (scatter in ChebConv) warns instead of failing
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
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


def _fit(config: FitConfig, dataset: str, decoder: str, entry: DecoderConfig, device: torch.device) -> dict:
    """Steps 1-4 of ``fit``; under torchrun every rank trains and rank 0 alone scores and writes."""
    started = time.perf_counter()
    # 1. data, standardised with training statistics
    data = load_fit_data(config, dataset, entry)
    # 2. train (early stopping on val) or ridge CV
    model, history = train_ridge(data, entry) if entry.kind == "ridge" else train_network(data, entry, device)
    if not distributed.is_main():  # the other ranks hold the same model: one writer
        return distributed.broadcast_object(None)
    metrics = _score_and_write(config, dataset, decoder, entry, data, model, history)
    print(f"fit {dataset}/{decoder}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return distributed.broadcast_object(metrics)


def _score_and_write(config: FitConfig, dataset: str, decoder: str, entry: DecoderConfig, data: FitData,
                     model: torch.nn.Module, history: list[dict]) -> dict:
    """Rank 0: validation metrics in target units; checkpoint, loss.csv and metrics.json, atomically."""
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
    # (the device only off the CPU, the process count only under torchrun: default checkpoints keep their bytes)
    shared = {k: v for k, v in config_to_record(config).items() if k != "decoders"}
    if distributed.world_size() > 1:
        shared["world_size"] = distributed.world_size()
    resolved = json.dumps({"dataset": dataset, "decoder": decoder, **shared, "entry": config_to_dict(entry)},
                          sort_keys=True)
    save_checkpoint(Path(config.models_dir) / dataset / f"{decoder}.safetensors", data.spec, model, data.mean,
                    data.std, resolved)
    out = Path(config.results_dir) / dataset / decoder
    rows = ["epoch,train_loss,val_loss"] + [f"{h['epoch']},{h['train_loss']:.8g},{h['val_loss']:.8g}" for h in history]
    write_text_atomic(out / "loss.csv", "\n".join(rows) + "\n")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--decoder", required=True)
    args = parser.parse_args(argv)
    with distributed.quiet_unless_main():  # under torchrun one summary line, rank 0's
        return run_stage(lambda: json.dumps(run(load_config(FitConfig, "fit", args.params), args.dataset,
                                                args.decoder), sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
