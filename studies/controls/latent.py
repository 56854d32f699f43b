"""The latent-Gaussian subject: the control study's condition with a known optimal decoder.

On the scene-based simulated subject even a linear brain gives a nonlinear decoding problem: z is a
nonlinear function of the image (the VAE), and the procedural scenes are far from Gaussian, so
E[z | voxels] is not linear and a nonlinear decoder may beat ridge for reasons that have nothing
to do with the brain. Here the world is built so that, for a linear brain, ridge *is* the
optimal decoder; the nonlinearity knob is the simulator's own (``encoding.nonlinear_response``):

    f_i ~ N(0, I_d)                               the i-th image's d latent features
    y_i = B f_i                                   the decoding target (K dims), linear in f
    s_iv = nonlinear_response(A f_i, g, theta)[v] noise-free voxel v (A: V x d), unit variance
    x_tiv = a_v s_iv + e_tv                       trial t of image i; e_t ~ N(0, sigma^2 C)

with ``C`` an AR(1) correlation along the voxel order (``noise_corr`` rho: neighbouring voxels
share noise, as in a smoothed BOLD map) and ``a_v`` = 1, or ``low_snr_scale`` for a random
``low_snr_fraction`` of the voxels (the weak tail of a real ROI). With g -> 0 and Gaussian f and
e, E[y | x] is linear in x: no decoder can beat a well-regularised ridge. The protocol is the main
pipeline's: training on single trials, validation images carved from the training images and
test images never seen in training, both with repeats averaged; voxels and targets z-scored with
training statistics only; the decoders are the main params' entries, fitted by ``fit``'s own
``train_ridge`` / ``train_network``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.config import from_dict, run_stage
from brainldm.train.data.roi_graph import GraphConfig, build_graph
from brainldm.train.decoding.decoders import DecoderSpec
from brainldm.train.decoding.fit import FitData, decoder_arch, deterministic, train_network, train_ridge
from brainldm.train.decoding.fit_config import DecoderConfig
from brainldm.train.evaluation.metrics import per_dimension_pearson, per_sample_pearson
from brainldm.train.simulation.encoding import nonlinear_response


@dataclass(frozen=True)
class LatentSubject:
    """One latent-Gaussian subject (module docstring for the symbols)."""

    nonlinearity_gain: float   # g
    threshold: float           # theta: response = nonlinear_response(drive, g, theta)
    n_train_images: int        # each shown n_repeats times: n_train_images * n_repeats trials
    n_test_images: int
    n_repeats: int
    n_latent: int              # d
    n_voxels: int              # V, split evenly over the decoders' input ROIs
    n_targets: int             # K
    noise_sd: float            # sigma: single-trial SNR 1 / sigma^2 for a full-amplitude voxel
    noise_corr: float          # rho of the AR(1) noise correlation between neighbouring voxels
    low_snr_fraction: float    # the share of voxels whose signal is scaled by low_snr_scale
    low_snr_scale: float
    val_fraction: float        # of the training images, carved out for early stopping
    seed: int


def _ar1_noise(rng: np.random.Generator, n: int, v: int, rho: float) -> np.ndarray:
    """(n, v) float64 Gaussian noise, unit variance, corr(e_j, e_k) = rho^|j-k|."""
    white = rng.standard_normal((n, v))
    if rho == 0:
        return white
    out = np.empty_like(white)
    out[:, 0] = white[:, 0]
    innovation = np.sqrt(1.0 - rho * rho)
    for j in range(1, v):  # e_j = rho e_(j-1) + sqrt(1 - rho^2) w_j keeps unit variance
        out[:, j] = rho * out[:, j - 1] + innovation * white[:, j]
    return out


def simulate(subject: LatentSubject) -> dict[str, np.ndarray]:
    """Arrays of one subject: ``x_train (n_train_images * n_repeats, V)`` single trials with
    ``train_image (n_trials,)``; ``x_val`` / ``x_test`` repeat averages ``(n, V)``; ``y_*`` the
    targets ``(n, K)``; all float32. Validation images are the last ``val_fraction`` of the
    training images (never in ``x_train``)."""
    rng = np.random.default_rng(subject.seed)
    d, v, k = subject.n_latent, subject.n_voxels, subject.n_targets
    mix, read = rng.standard_normal((v, d)), rng.standard_normal((k, d)) / np.sqrt(d)
    amplitude = np.where(rng.random(v) < subject.low_snr_fraction, subject.low_snr_scale, 1.0)
    n_images = subject.n_train_images + subject.n_test_images
    f = rng.standard_normal((n_images, d))
    # the response's z-scoring uses all images' distribution, like the simulator's voxel_signal:
    # a property of the simulated brain, not a statistic any decoder sees
    signal = amplitude * nonlinear_response(f @ mix.T, subject.nonlinearity_gain, subject.threshold)
    trials = np.repeat(np.arange(n_images), subject.n_repeats)
    noise = subject.noise_sd * _ar1_noise(rng, len(trials), v, subject.noise_corr)
    x = signal[trials] + noise
    averaged = x.reshape(n_images, subject.n_repeats, v).mean(axis=1)
    y = f @ read.T
    n_val = max(2, int(round(subject.val_fraction * subject.n_train_images)))
    n_fit = subject.n_train_images - n_val
    fit_rows = trials < n_fit
    as32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return {"x_train": as32(x[fit_rows]), "train_image": trials[fit_rows], "y_train": as32(y[trials[fit_rows]]),
            "x_val": as32(averaged[n_fit:subject.n_train_images]), "y_val": as32(y[n_fit:subject.n_train_images]),
            "x_test": as32(averaged[subject.n_train_images:]), "y_test": as32(y[subject.n_train_images:])}


def _standardiser(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = train.std(axis=0, dtype=np.float64)
    return train.mean(axis=0, dtype=np.float64).astype(np.float32), np.where(std > 0, std, 1).astype(np.float32)


def _zscored_inputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``x_train`` / ``x_val`` / ``x_test`` z-scored with the training trials' statistics (float32)."""
    mean, std = _standardiser(arrays["x_train"])
    return {name: (arrays[name] - mean) / std for name in ("x_train", "x_val", "x_test")}


def fit_data(arrays: dict[str, np.ndarray], x: dict[str, np.ndarray], entry: DecoderConfig,
             graph: GraphConfig) -> FitData:
    """``FitData`` for one decoder entry: ``x`` the voxels z-scored with training statistics only
    (``_zscored_inputs``), the targets likewise; the voxels split in order and evenly into the
    entry's input ROIs; the GCN's graph built by ``prepare``'s own ``build_graph`` from the
    training trials, with the main params' nodes."""
    n_voxels = arrays["x_train"].shape[1]
    parts = np.array_split(np.arange(n_voxels), len(entry.input_rois))
    y_mean, y_std = _standardiser(arrays["y_train"])
    x_train = x["x_train"]
    edges, node_rois = None, None
    if entry.kind == "gcn":
        roi_graph = build_graph({roi: x_train[:, cols] for roi, cols in zip(entry.input_rois, parts)}, graph)
        edges = (torch.from_numpy(roi_graph.edge_index.astype(np.int64)),
                 torch.from_numpy(roi_graph.edge_weight.astype(np.float32)))
        node_rois = roi_graph.node_rois
    spec = DecoderSpec(kind=entry.kind, target=entry.target, target_shape=(arrays["y_train"].shape[1],),
                       input_rois=tuple(entry.input_rois), roi_sizes=tuple(len(c) for c in parts),
                       arch=decoder_arch(entry), node_rois=node_rois)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return FitData(t(x_train), t((arrays["y_train"] - y_mean) / y_std), t(x["x_val"]),
                   t((arrays["y_val"] - y_mean) / y_std), arrays["train_image"], t(y_mean), t(y_std), spec, edges)


def predict_test(arrays: dict[str, np.ndarray], entry: DecoderConfig, graph: GraphConfig) -> np.ndarray:
    """Fit ``entry`` on the subject's training trials (early stopping on validation) and return
    its prediction of the test images' targets, ``(n_test_images, K)`` float32, in y's units."""
    x = _zscored_inputs(arrays)
    data = fit_data(arrays, x, entry, graph)
    model, _ = train_ridge(data, entry) if entry.kind == "ridge" else train_network(data, entry)
    with torch.no_grad():
        pred = model.eval()(torch.from_numpy(x["x_test"])).numpy()
    return pred * data.std.numpy() + data.mean.numpy()


def subject_from(settings: dict, defaults: dict, where: str = "latent") -> LatentSubject:
    """A ``LatentSubject`` from a condition's settings over the study's defaults; an unknown or
    missing key is an error naming it."""
    return from_dict(LatentSubject, {**defaults, **settings}, where=where, strict=True)


def run_inputs(inputs: dict) -> dict:
    """Fit and score every decoder of one condition.

    ``inputs``: ``subject`` (LatentSubject fields), ``decoders`` (name -> the main params'
    ``fit.decoders`` entry), ``graph`` (``prepare.graph``), ``threads``. Returns, per decoder,
    the test images' per-image r (list, float64), the mean over target dims of the per-dim r
    (``r_per_dim``) and the fit's wall seconds; and the number of training trials.
    """
    subject = from_dict(LatentSubject, inputs["subject"], where="subject", strict=True)
    graph = from_dict(GraphConfig, inputs["graph"], where="graph", strict=True)
    arrays = simulate(subject)
    scores = {}
    with deterministic(inputs["threads"], torch.device("cpu")):
        for name, raw in inputs["decoders"].items():
            entry = from_dict(DecoderConfig, raw, where=f"decoders.{name}", strict=True)
            start = time.perf_counter()
            pred = predict_test(arrays, entry, graph)
            scores[name] = {"per_image_r": per_sample_pearson(arrays["y_test"], pred).astype(np.float64).tolist(),
                            "r_per_dim": float(np.nanmean(per_dimension_pearson(arrays["y_test"], pred))),
                            "seconds": round(time.perf_counter() - start, 1)}
    return {"n_train_trials": int(len(arrays["x_train"])), "decoders": scores}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One latent-Gaussian condition of the control study.")
    parser.add_argument("--inputs", required=True, help="the condition's inputs.json (written by run.py)")
    parser.add_argument("--out", required=True, help="scores JSON to write")
    args = parser.parse_args(argv)

    def work() -> str:
        result = run_inputs(json.loads(Path(args.inputs).read_text()))
        write_text_atomic(Path(args.out), json.dumps(result) + "\n")
        return f"wrote {args.out}"
    return run_stage(work)


if __name__ == "__main__":
    sys.exit(main())
