"""Benchmark: the lean runtime (bundle + onnxruntime/TensorRT) vs the diffusers reference path.

Both sides reconstruct the same batch of raw-beta items with the same model, steps,
strength, guidance and seeded noise. Each side runs in its own subprocess, so peak
RSS (``getrusage``) and cold start (imports + model/bundle load) are its own. Reported
per side: images/s, per-stage seconds per batch (decoders, UNet loop, VAE encode +
decodes, the rest = preprocessing, DDIM, noise), peak RSS, cold start; and the
runtime/reference ratios.

    python bench/bench_runtime.py                       # CPU fp32: small-LDM architecture, random weights
    python bench/bench_runtime.py --model tiny          # CPU fp32: the tests' tiny model
    python bench/bench_runtime.py --bundle bundles/sim-nsd-ours --batch 4 --threads 2
    python bench/bench_runtime.py --gpu                  # SD v1.4 architecture, random weights, 512 px fp16

``--gpu`` builds SD v1.4's UNet and VAE from their configs (written below; no download)
with random weights, exports a bundle (fp32 + fp16 graphs, TensorRT engines when
tensorrt is importable), then times the fp16 reference (diffusers on CUDA) and every
available runtime backend at batch 1, 4 and 16, reporting images/s and the achieved
TFLOP/s (FLOPs counted with torch's FlopCounterMode) against the GPU's peak.
Writes bench/results/runtime.json (one entry per mode, merged with earlier runs).
Peak RSS is VmHWM of the worker process (its own address space).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from brainldm.runtime.bundle_format import read_manifest
from bench_bundles import (GPU_BATCHES, GPU_RESOLUTION, REPO, build_small_ldm_bundle, build_sd14_bundle,
                           flops_per_image, tiny_bundle)

DEFAULT_OUT = REPO / "bench" / "results" / "runtime.json"
STAGES = ("decoders", "unet", "vae")
GPU_BACKENDS = ("ort-cuda", "ort-trt", "tensorrt")
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, matched by device-name substring.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM belongs to the address space, so unlike getrusage's ru_maxrss
    it does not inherit the peak of the (larger) parent that spawned the worker."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_inputs(bundle: Path, batch: int, seed: int = 0):
    """``batch`` raw-beta items (one trial each) drawn around the bundle's first session's statistics."""
    import numpy as np

    manifest = read_manifest(bundle)
    mean = np.load(bundle / manifest.normalisation.mean)[0]
    std = np.load(bundle / manifest.normalisation.std)[0]
    rng = np.random.default_rng(seed)
    betas = (mean + std * rng.standard_normal((batch, len(mean)))).astype(np.float32)
    return manifest, betas, np.full(batch, manifest.input.sessions[0], np.int64)


class Timers:
    """Accumulated seconds per stage; ``sync`` makes GPU work finish inside the timed span."""

    def __init__(self, sync=None):
        self.seconds = {s: 0.0 for s in STAGES}
        self.sync = sync or (lambda: None)

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[stage] += time.perf_counter() - start
            return out
        return timed


def _summary(timers: Timers, total: float, repeats: int, batch: int, cold: float) -> dict:
    stages = {k: v / repeats for k, v in timers.seconds.items()}
    stages["other"] = total / repeats - sum(stages.values())
    return {"batch": batch, "seconds_per_batch": total / repeats, "images_per_s": batch * repeats / total,
            "stage_seconds_per_batch": stages, "cold_start_s": cold, "peak_rss_mb": peak_rss_mb()}


def worker_runtime(args) -> dict:
    """One side of the benchmark in this process: the lean runtime."""
    start = time.perf_counter()
    from brainldm.runtime.reconstructor import Reconstructor

    rec = Reconstructor(args.bundle, backend=args.backend, threads=args.threads, fp16=args.fp16)
    cold = time.perf_counter() - start
    timers = Timers()
    stage_of = {"z_decoder": "decoders", "c_decoder": "decoders", "unet": "unet", "vae_decoder": "vae",
                "vae_encoder": "vae"}
    for name, model in rec.models.items():
        model.run = timers.wrap(stage_of[name], model.run)
    results = {}
    for batch in args.batches:
        manifest, betas, session = bench_inputs(Path(args.bundle), batch)
        import numpy as np

        def one():
            predicted = rec.predict_targets(betas, session)
            items = np.arange(batch)
            return rec.generate(predicted.z, predicted.c, items, np.zeros(batch, np.int64), manifest.generation.seed)

        one()  # warm-up (ORT/TensorRT allocations, kernel selection)
        timers.seconds = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            one()
        results[str(batch)] = _summary(timers, time.perf_counter() - t0, args.repeats, batch, cold)
    return results


def _time_reference_stages(pipe, predictors: dict, timers: Timers) -> None:
    """Wrap the reference's decoders, UNet and VAE calls so ``timers`` sums their seconds per stage."""
    for predictor in predictors.values():
        predictor.forward = timers.wrap("decoders", predictor.forward)
    pipe.unet.forward = timers.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = timers.wrap("vae", pipe.vae.decode)
    pipe.vae.encode = timers.wrap("vae", pipe.vae.encode)


def worker_reference(args) -> dict:
    """The other side: torch decoders + diffusers img2img (train/reconstruction/reconstruct.py's arithmetic)."""
    start = time.perf_counter()
    import numpy as np
    import torch

    from brainldm.train.decoding import decoders
    from brainldm.train.reconstruction.reconstruct import ReconstructConfig, load_reference_pipeline, reconstruct_batch

    torch.set_num_threads(max(args.threads, 1))
    manifest = read_manifest(Path(args.bundle))
    device = "cuda" if args.gpu else "cpu"
    dtype = torch.float16 if args.gpu else torch.float32
    pipe = load_reference_pipeline(manifest.image_model.source, device, dtype)
    models_dir = Path(manifest.config["export"]["models_dir"]) / manifest.dataset
    predictors = {k: decoders.load_checkpoint(models_dir / f"{d.name}.safetensors").predictor().to(device)
                  for k, d in manifest.decoders.items()}
    cold = time.perf_counter() - start
    sync = torch.cuda.synchronize if args.gpu else None
    timers = Timers(sync)
    _time_reference_stages(pipe, predictors, timers)
    g = manifest.generation
    cfg = ReconstructConfig(steps=g.steps, strength=g.strength, guidance=g.guidance, seed=g.seed,
                            encode_mode=g.encode_mode, resolution=manifest.image_model.resolution)
    uncond = np.load(Path(args.bundle) / manifest.uncond)
    mean = np.load(Path(args.bundle) / manifest.normalisation.mean)[0]
    std = np.load(Path(args.bundle) / manifest.normalisation.std)[0]
    columns = {k: np.load(Path(args.bundle) / d.columns) for k, d in manifest.decoders.items()}
    results = {}
    for batch in args.batches:
        x = (bench_inputs(Path(args.bundle), batch)[1] - mean) / std

        @torch.no_grad()
        def one():
            pred = {k: p(torch.from_numpy(np.ascontiguousarray(x[:, columns[k]])).to(device)).float().cpu().numpy()
                    for k, p in predictors.items()}
            return reconstruct_batch(pipe, pred["z"], pred["c"], uncond, np.arange(batch), np.zeros(batch, np.int64), cfg)

        one()
        timers.seconds = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            one()
        results[str(batch)] = _summary(timers, time.perf_counter() - t0, args.repeats, batch, cold)
        if args.gpu:
            results[str(batch)]["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return results


def run_worker(side: str, args, extra: list[str]) -> dict:
    """Run one side in a fresh interpreter; returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", side, "--bundle", str(args.bundle), "--threads",
               str(args.threads), "--repeats", str(args.repeats), "--json-out", str(out),
               "--batches", *map(str, args.batches), *extra]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def ratios(runtime: dict, reference: dict) -> dict:
    """runtime / reference per batch: throughput (higher is better), RSS and cold start (lower is better)."""
    out = {}
    for batch, r in runtime.items():
        ref = reference[batch]
        out[batch] = {"images_per_s": r["images_per_s"] / ref["images_per_s"],
                      "peak_rss": r["peak_rss_mb"] / ref["peak_rss_mb"],
                      "cold_start": r["cold_start_s"] / ref["cold_start_s"]}
    return out


def merge_results(path: Path, key: str, entry: dict) -> None:
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    from brainldm.runtime.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(results, indent=1, sort_keys=True))


def main_cpu(args) -> dict:
    # A bundle built here lives in a temporary folder: record what it is, not where it was.
    args.bundle_built_here = args.bundle is None
    model = None if args.bundle else f"{args.model} architecture, random weights"
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            if args.model == "tiny":
                args.bundle = tiny_bundle(Path(tmp), args.steps)
            else:
                args.bundle = build_small_ldm_bundle(Path(tmp), args.steps, args.params)
        reference = run_worker("reference", args, [])
        runtime = run_worker("runtime", args, ["--backend", "ort-cpu"])
        manifest = read_manifest(Path(args.bundle))
    entry = {"model": model or manifest.image_model.source, "resolution": manifest.image_model.resolution,
             "generation": dataclasses.asdict(manifest.generation), "threads": args.threads, "repeats": args.repeats,
             "reference": reference, "runtime_ort_cpu": runtime, "ratio_runtime_over_reference": ratios(runtime, reference)}
    for batch, r in entry["ratio_runtime_over_reference"].items():
        print(f"batch {batch}: runtime {runtime[batch]['images_per_s']:.2f} img/s vs reference "
              f"{reference[batch]['images_per_s']:.2f} img/s (x{r['images_per_s']:.2f}); peak RSS "
              f"{runtime[batch]['peak_rss_mb']:.0f} vs {reference[batch]['peak_rss_mb']:.0f} MB; cold start "
              f"{runtime[batch]['cold_start_s']:.2f} vs {reference[batch]['cold_start_s']:.2f} s")
    return entry


def main_gpu(args) -> dict:
    import torch

    device = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS if k in device), None)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-runtime-gpu-"))
    args.bundle, args.batches = build_sd14_bundle(root, args.steps), list(GPU_BATCHES)
    flops = flops_per_image(args.steps, 0.8)
    entry = {"device": device, "peak_tflops_fp16_dense": peak, "flops": flops, "resolution": GPU_RESOLUTION,
             "steps": args.steps, "reference_fp16": run_worker("reference", args, ["--gpu"])}
    for backend in GPU_BACKENDS:
        try:
            entry[f"runtime_{backend}"] = run_worker("runtime", args, ["--backend", backend] +
                                                     (["--fp16"] if backend == "ort-cuda" else []))
        except subprocess.CalledProcessError as exc:
            entry[f"runtime_{backend}"] = {"error": f"worker failed with exit code {exc.returncode}"}
    for side in [k for k in entry if k.startswith(("reference", "runtime"))]:
        for batch, r in entry[side].items() if "error" not in entry[side] else ():
            r["achieved_tflops"] = r["images_per_s"] * flops["per_image"] / 1e12
            r["fraction_of_peak"] = r["achieved_tflops"] / peak if peak else None
            print(f"{side} batch {batch}: {r['images_per_s']:.2f} img/s, {r['achieved_tflops']:.1f} TFLOP/s")
    return entry


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to benchmark (CPU mode; default: tiny model)")
    parser.add_argument("--model", choices=("tiny", "small-ldm"), default="small-ldm",
                        help="CPU mode without --bundle: the tests' tiny model or the default small LDM's "
                             "architecture (from --params), random weights")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="small-ldm: the architecture is read from this file's train_ldm section")
    parser.add_argument("--batches", type=int, nargs="+", default=[4], help="batch sizes (CPU mode)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the tiny/GPU bundle built here")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each side (torch and onnxruntime)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches after one warm-up")
    parser.add_argument("--gpu", action="store_true", help="SD v1.4 architecture at 512 px fp16 on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak (default: from the device name)")
    parser.add_argument("--workdir", default=None, help="GPU mode: where the model and bundle are built")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", choices=("runtime", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="ort-cpu", help=argparse.SUPPRESS)
    parser.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = (worker_runtime if args.worker == "runtime" else worker_reference)(args)
        args.json_out.write_text(json.dumps(result))
        return 0
    entry = main_gpu(args) if args.gpu else main_cpu(args)
    if args.gpu:
        key = "gpu_sd14_512_fp16"
    else:
        label = args.model if args.bundle_built_here else Path(entry["model"]).name
        key = f"cpu_{label}_threads{args.threads}"
    merge_results(args.out, key, entry)
    print(f"wrote {args.out} [{key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
