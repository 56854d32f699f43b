"""Stage `parity`: the lean runtime against the PyTorch reference, on the same inputs and noise.

Runtime path: raw test trials (``raw_test/*`` of the prepared file) -> session z-scores
-> repeats averaged per image -> ONNX decoders -> numpy DDIM img2img on ORT.
Reference path: the prepared test split -> torch decoders (as the decode stage) ->
``train.reconstruct.reconstruct_batch`` (diffusers). Both seed their noise per
(test item, sample) with the same numpy streams. Compared: decoder predictions,
latents after every DDIM step of the runtime's loop started from the reference's init latents
(fp32 CPU tolerance 1e-4; the VAE round trip before the loop is reported apart, as
``init_latent_max_abs``: torch's fp32 VAE decoder is itself up to ~4e-4 from float64 on
out-of-distribution latents, ORT's ~3e-6) and final images end to end in [0, 1] (max abs
1e-2); fp16 graphs and TensorRT backends are judged by image PSNR instead (``psnr_min``),
as their per-step latents legitimately drift, and so is a reference run on CUDA or in half
precision (``parity.device``, ``parity.dtype``: train/compute_options.py). The metrics JSON is
written in any case; a failed check exits non-zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from brainldm.runtime.atomic import write_text_atomic
from brainldm.runtime.bundle_format import DECODER_KEYS
from brainldm.runtime.generation import to_uint8
from brainldm.runtime.reconstructor import Reconstructor
from brainldm.train.decoding import decode, decoders
from brainldm.train.compute_options import stage_device_dtype
from brainldm.train.config import ConfigError, config_to_record, execution_option, load_config, run_stage
from brainldm.train.reconstruction.reconstruct import ReconstructConfig, load_reference_pipeline, reconstruct_batch

GENERATION_KEYS = ("steps", "strength", "guidance", "encode_mode")
LOW_PRECISION_BACKENDS = ("ort-trt", "tensorrt")
PSNR_CAP_DB = 100.0  # reported for identical images (keeps the JSON finite)


@dataclass(frozen=True)
class ParityConfig:
    """Params section `parity` (generation settings and pairs come from section `reconstruct`)."""

    prepared_dir: str = "data/prepared"
    models_dir: str = "models/decoders"
    bundles_dir: str = "bundles"
    results_dir: str = "results/parity"
    backend: str = "ort-cpu"
    fp16: bool = False  # ONNX backends: the bundle's fp16 UNet/VAE graphs
    threads: int = 1
    device: str = execution_option("cpu")  # the reference side's: cpu | cuda | auto
    dtype: str = execution_option("float32")  # the reference diffusion's; float16 / bfloat16 on CUDA only
    items: int = 4  # first test items compared (0 = all)
    samples: int = 2
    batch_size: int = 4
    pred_atol: float = 1.0e-4
    latent_atol: float = 1.0e-4
    # Step latents pass where |runtime - reference| <= latent_atol + latent_rtol * |reference|
    # (numpy.allclose); 0 keeps the pure max-abs criterion.
    latent_rtol: float = 1.0e-4
    image_atol: float = 1.0e-2
    psnr_min: float = 30.0  # fp16 / TensorRT runs are judged by PSNR (dB) of images vs the fp32 reference


class ParityError(ValueError):
    """The runtime disagrees with the reference beyond the tolerances."""


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A reference tensor as a float32 numpy copy (on CPU in float32: the same values, copied)."""
    return x.detach().to("cpu", torch.float32).numpy().copy()


class StepRecorder:
    """Wraps a diffusers scheduler's ``step`` to keep every step's prev_sample (B, C, h, w) float32."""

    def __init__(self, scheduler):
        self.steps: list[np.ndarray] = []
        self._step = scheduler.step
        scheduler.step = self

    def __call__(self, *args, **kwargs):
        out = self._step(*args, **kwargs)
        self.steps.append(to_numpy(out[0]))
        return out


def reference_predictions(cfg: ParityConfig, rc: ReconstructConfig, dataset: str, pair: str) -> dict[str, np.ndarray]:
    """Torch decoders on ``cfg.device`` on the prepared test split: z (n, C, h, w), c (n, T, D), image_index (n,)."""
    prepared = Path(cfg.prepared_dir) / f"{dataset}.h5"
    out = {}
    for key in DECODER_KEYS:
        name = getattr(rc.pairs[pair], key)
        checkpoint = decoders.load_checkpoint(Path(cfg.models_dir) / dataset / f"{name}.safetensors")
        x, image_index, _ = decode.load_inputs(prepared, "test", checkpoint.spec.input_rois)
        out[key] = decode.predict(checkpoint, x, cfg.batch_size, cfg.device)
        out["image_index"] = image_index
    return out


def read_raw_test(prepared: Path) -> dict[str, np.ndarray]:
    """betas (n, V) float32, session (n,), image_index (n,) int64 of the raw test trials."""
    with h5py.File(prepared, "r") as f:
        return {k: np.asarray(f[f"raw_test/{k}"]) for k in ("betas", "session", "image_index")}


class InitRecorder:
    """Wraps the pipeline's ``prepare_latents`` to keep the re-encoded init latents (B, C, h, w) float32 it is given."""

    def __init__(self, pipe):
        self.init: np.ndarray | None = None
        self._prepare = pipe.prepare_latents
        pipe.prepare_latents = self

    def __call__(self, image, *args, **kwargs):
        self.init = to_numpy(image)
        return self._prepare(image, *args, **kwargs)


def reference_run(pipe, z: np.ndarray, c: np.ndarray, uncond: np.ndarray, items: np.ndarray, samples: np.ndarray,
                  rc: ReconstructConfig) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The reference on one batch: images (B, R, R, 3), step latents [(B, C, h, w)], init latents (B, C, h, w)."""
    steps, init = StepRecorder(pipe.scheduler), InitRecorder(pipe)
    try:
        images = reconstruct_batch(pipe, z, c, uncond, items, samples, rc)
    finally:
        pipe.scheduler.step, pipe.prepare_latents = steps._step, init._prepare
    return images, steps.steps, init.init


def runtime_run(rec: Reconstructor, z: np.ndarray, c: np.ndarray, items: np.ndarray, samples: np.ndarray, seed: int,
                init: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The runtime on one batch: images (B, R, R, 3) and step latents [(B, C, h, w)]."""
    steps: list[np.ndarray] = []
    images = rec.generate(z, c, items, samples, seed, on_step=lambda i, t, x: steps.append(x), init=init)
    return images, steps


def step_differences(expected: list[np.ndarray], got: list[np.ndarray], cfg: ParityConfig) -> tuple[list[float], float]:
    """Max abs difference per step, and the largest |got - expected| / (latent_atol + latent_rtol |expected|)."""
    pairs = list(zip(expected, got, strict=True))
    ratio = max(float((np.abs(b - a) / (cfg.latent_atol + cfg.latent_rtol * np.abs(a))).max()) for a, b in pairs)
    return [float(np.abs(a - b).max()) for a, b in pairs], ratio


def compare_generation(rec: Reconstructor, pipe, ref: dict, run: dict, rc: ReconstructConfig, cfg: ParityConfig) -> dict:
    """Per-batch reference vs runtime generation.

    Images: each side end to end from its own predictions (what users get). Step latents: the
    runtime's denoising loop started from the reference's init latents and text states (the same
    inputs), so that the loop is judged apart from the VAE round trip before it, whose difference
    is reported as ``init_latent_max_abs``.
    """
    n = len(ref["z"]) if cfg.items <= 0 else min(cfg.items, len(ref["z"]))
    items, samples = np.divmod(np.arange(n * cfg.samples), cfg.samples)
    step_errors, e2e_errors, init_error, image_error, uint8_error, squared, ratio = None, None, 0.0, 0.0, 0, [], 0.0
    for start in range(0, len(items), cfg.batch_size):
        it, sa = items[start:start + cfg.batch_size], samples[start:start + cfg.batch_size]
        expected, ref_steps, ref_init = reference_run(pipe, ref["z"][it], ref["c"][it], rec.bundle.uncond, it, sa, rc)
        run_init = rec.reencode(run["z"][it], it, sa, rc.seed, None)
        got, e2e_steps = runtime_run(rec, run["z"][it], run["c"][it], it, sa, rc.seed, init=run_init)
        _, loop_steps = runtime_run(rec, ref["z"][it], ref["c"][it], it, sa, rc.seed, init=ref_init)
        errors, batch_ratio = step_differences(ref_steps, loop_steps, cfg)
        step_errors = errors if step_errors is None else np.maximum(step_errors, errors).tolist()
        e2e = step_differences(ref_steps, e2e_steps, cfg)[0]
        e2e_errors = e2e if e2e_errors is None else np.maximum(e2e_errors, e2e).tolist()
        ratio = max(ratio, batch_ratio)
        init_error = max(init_error, float(np.abs(run_init - ref_init).max()))
        image_error = max(image_error, float(np.abs(got - expected).max()))
        squared.append(((got.astype(np.float64) - expected) ** 2).ravel())
        uint8_error = max(uint8_error, int(np.abs(to_uint8(got).astype(int) - to_uint8(expected).astype(int)).max()))
    mse = float(np.concatenate(squared).mean())
    return {"n_items": int(n), "samples": cfg.samples, "latent_max_abs_per_step": step_errors,
            "latent_max_abs": float(max(step_errors)), "latent_tolerance_ratio": ratio,
            "init_latent_max_abs": init_error, "end_to_end_latent_max_abs": float(max(e2e_errors)),
            "image_max_abs": image_error, "uint8_max_abs": uint8_error,
            "image_psnr_db": float(min(10 * np.log10(1.0 / mse), PSNR_CAP_DB)) if mse > 0 else PSNR_CAP_DB}


def check_settings(rec: Reconstructor, rc: ReconstructConfig) -> None:
    """The bundle must have been exported with the reference's generation settings."""
    exported = rec.bundle.generation
    differ = {k: (getattr(exported, k), getattr(rc, k)) for k in GENERATION_KEYS
              if getattr(exported, k) != getattr(rc, k)}
    resolution = rc.resolution or rec.bundle.image_model.native_resolution
    if rec.resolution != resolution:
        differ["resolution"] = (rec.resolution, resolution)
    if differ:
        raise ParityError(f"bundle {rec.bundle.root} was exported with other generation settings than params "
                          f"reconstruct (bundle, params): {differ}; re-run the export stage")


def low_precision(cfg: ParityConfig) -> bool:
    """fp16 graphs or TensorRT (fp16 engines / EP) cannot meet fp32 tolerances, nor a reference on CUDA
    (other kernels; cuDNN's TF32 convolutions) or in half precision: they are judged by PSNR.
    ``cfg.device`` as run resolves it ("auto" counts as CUDA)."""
    return cfg.fp16 or cfg.backend in LOW_PRECISION_BACKENDS or cfg.device != "cpu" or cfg.dtype != "float32"


def passes(metrics: dict, cfg: ParityConfig) -> bool:
    """fp32: predictions, step latents and images within their max-abs tolerances; else image PSNR >= psnr_min."""
    if low_precision(cfg):
        return bool(metrics["image_psnr_db"] >= cfg.psnr_min)
    return bool(max(metrics["pred_z_max_abs"], metrics["pred_c_max_abs"]) <= cfg.pred_atol
                and metrics["latent_tolerance_ratio"] <= 1.0 and metrics["image_max_abs"] <= cfg.image_atol)


def run(cfg: ParityConfig, rc: ReconstructConfig, dataset: str, pair: str) -> dict:
    """Compare runtime and reference; returns the metrics dict (``passed`` says whether all tolerances hold)."""
    if pair not in rc.pairs:
        raise ConfigError(f"unknown pair '{pair}'; configured pairs (reconstruct.pairs): {sorted(rc.pairs)}")
    device, dtype = stage_device_dtype("parity", cfg.device, cfg.dtype)
    cfg = dataclasses.replace(cfg, device=device.type)  # "auto" resolved: what ran, in the metrics too
    # 1. Runtime predictions from raw trials; reference predictions from the prepared split.
    rec = Reconstructor(Path(cfg.bundles_dir) / f"{dataset}-{pair}", backend=cfg.backend, threads=cfg.threads,
                        fp16=cfg.fp16)
    check_settings(rec, rc)
    raw = read_raw_test(Path(cfg.prepared_dir) / f"{dataset}.h5")
    predicted = rec.predict_targets(raw["betas"], raw["session"], raw["image_index"], cfg.batch_size)
    ref = reference_predictions(cfg, rc, dataset, pair)
    if not np.array_equal(predicted.ids, ref["image_index"]):
        raise ParityError(f"runtime items {predicted.ids.tolist()} (sorted raw_test image indices) differ from the test "
                          f"split's image_index {ref['image_index'].tolist()}")
    metrics = {"dataset": dataset, "pair": pair, "backend": cfg.backend,
               "pred_z_max_abs": float(np.abs(predicted.z - ref["z"]).max()),
               "pred_c_max_abs": float(np.abs(predicted.c - ref["c"]).max())}
    # 2. Generation from each side's own predictions, with the same seeded noise.
    pipe = load_reference_pipeline(rc.model, device, dtype)
    metrics.update(compare_generation(rec, pipe, ref, {"z": predicted.z, "c": predicted.c}, rc, cfg))
    metrics["passed"] = passes(metrics, cfg)
    metrics["tolerances"] = {"pred": cfg.pred_atol, "latent": cfg.latent_atol, "latent_rtol": cfg.latent_rtol,
                             "image": cfg.image_atol,
                             "psnr_min": cfg.psnr_min, "judged_by": "psnr" if low_precision(cfg) else "max_abs"}
    metrics["config"] = {"parity": config_to_record(cfg), "reconstruct": config_to_record(rc)}
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--pair", required=True)
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_config(ParityConfig, "parity", args.params)
        rc = load_config(ReconstructConfig, "reconstruct", args.params)
        torch.set_num_threads(max(cfg.threads, 1))
        metrics = run(cfg, rc, args.dataset, args.pair)
        out = Path(cfg.results_dir) / f"{args.dataset}-{args.pair}.json"
        # written in any case: a failed run's numbers are what tells how far off it is
        write_text_atomic(out, json.dumps(metrics, indent=2, sort_keys=True))
        summary = (f"wrote {out}: latents {metrics['latent_max_abs']:.2e}, images {metrics['image_max_abs']:.2e}, "
                   f"passed={metrics['passed']}")
        if not metrics["passed"]:
            raise ParityError(f"runtime/reference parity failed beyond the tolerances {metrics['tolerances']} "
                              f"({summary})")
        return summary
    return run_stage(work)


if __name__ == "__main__":
    sys.exit(main())
