"""One script for a GPU machine's first minutes: GPU tests, SD v1.4-shaped reference timing, GPU backends.

    python bench/device_check.py --out device_check.json        # on a CUDA machine (~3-8 min)
    python bench/device_check.py --dry --out /tmp/dry.json      # CPU, tiny shapes, under a minute

1. ``pytest -m gpu`` (pyproject's addopts is only ``-ra``: nothing deselects the gpu tests; without
   CUDA, tests/conftest.py skips them, so there the counts say "skipped"): pass/fail counts from JUnit XML.
2. The reference reconstruction, train/reconstruction/reconstruct.py's ``load_reference_pipeline`` and
   ``reconstruct_batch`` (what the reconstruct stage runs), on SD v1.4's UNet and VAE built from
   their published configs (bench/bench_bundles.py) with random weights, nothing downloaded, at 512 px
   in float16 on CUDA, batches 1, 4 and 16, with params.yaml's steps, strength and guidance; images/s,
   GPU memory, TFLOP/s (FLOPs counted by bench_bundles.flops_per_image). ``--dry``: the same code on
   an SD-shaped model of tiny widths at 64 px, CPU float32, 4 steps.
3. The runtime's GPU backends (ort-cuda, ort-trt, tensorrt): "not run" with the reason where their
   packages are missing (onnxruntime-gpu, tensorrt); otherwise bench/bench_runtime.py ``--gpu``.

The JSON at ``--out`` is rewritten after every part, so a run cut short keeps what it measured.
A part that fails records its error and the next one still runs; the exit status is 1 if any did.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench_bundles import GPU_BATCHES, REPO, SD14_UNET, SD14_VAE, SD_TEXT_SHAPE, flops_per_image, save_random_model

from brainldm.runtime.atomic import write_text_atomic
from brainldm.runtime.backends import ORT_PROVIDERS

GPU_BACKENDS = ("ort-cuda", "ort-trt", "tensorrt")
# SD v1.4's block types and layout at tiny widths: the dry run exercises the same code at 64 px.
DRY_UNET = dict(SD14_UNET, sample_size=8, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
DRY_VAE = dict(SD14_VAE, sample_size=64, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
DRY_BATCHES, DRY_STEPS = (1, 2), 4
OUTPUT_TAIL = 3000  # characters of a failed subprocess's output kept in the JSON


class Budget:
    """Seconds left of the whole check (``--budget-s``), shared by the parts' subprocess timeouts."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        """At most ``cap`` seconds, and never past the deadline (at least 1 s)."""
        return max(1.0, min(cap, self.deadline - time.monotonic()))


def environment() -> dict:
    """Versions and the CUDA device, if any."""
    import diffusers
    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda_available": cuda, "torch_cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if cuda else None, "cpu": platform.processor() or None}


def junit_counts(xml_file: Path) -> dict:
    """passed / failed / errors / skipped counts, failing test ids and skip reasons of a JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in ET.parse(xml_file).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome in ("failure", "error"):
            counts["failed" if outcome == "failure" else "errors"] += 1
            counts["failures"].append(test_id)
        elif outcome == "skipped":
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            if reason not in counts["skip_reasons"]:
                counts["skip_reasons"].append(reason)
        else:
            counts["passed"] += 1
    return counts


def run_gpu_tests(paths: list[str], timeout: float) -> dict:
    """``pytest -m gpu`` on ``paths`` in a subprocess (the repository's pytest config and conftest)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml_file = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml_file}", *paths]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"pytest ran past {timeout:.0f} s"}
        shown = [part for part in cmd[1:] if not part.startswith("--junitxml")]
        result = {"status": "ok" if proc.returncode == 0 else "error", "command": shown,
                  "exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if xml_file.is_file():
            result.update(junit_counts(xml_file))
        if proc.returncode != 0:
            result["output_tail"] = (proc.stdout + proc.stderr)[-OUTPUT_TAIL:]
    return result


def build_model(folder: Path, dry: bool) -> Path:
    """SD v1.4's UNet and VAE (tiny widths with ``dry``), random weights, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    # initialised on the GPU where there is one: SD's 860M UNet parameters take ~1 min on a CPU
    with torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu"):
        unet = UNet2DConditionModel(**(DRY_UNET if dry else SD14_UNET))
        vae = AutoencoderKL(**(DRY_VAE if dry else SD14_VAE))
    return save_random_model(folder, vae.cpu(), unet.cpu())


def reference_inputs(pipe, batch: int, seed: int = 0):
    """z (B, 4, h, w), c (B, 77, D) and uncond (77, D) float32 standard normal, shaped to ``pipe``."""
    import numpy as np

    from brainldm.train.reconstruction.reconstruct import native_resolution

    side = native_resolution(pipe) // int(pipe.vae_scale_factor)
    width = int(pipe.unet.config.cross_attention_dim)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, int(pipe.vae.config.latent_channels), side, side)).astype(np.float32)
    c = rng.standard_normal((batch, SD_TEXT_SHAPE[0], width)).astype(np.float32)
    return z, c, rng.standard_normal((SD_TEXT_SHAPE[0], width)).astype(np.float32)


def time_reference(folder: Path, cfg, batches, repeats: int) -> dict:
    """Images/s of ``reconstruct_batch`` per batch size (one warm-up batch each), on ``cfg``'s device/dtype."""
    import numpy as np
    import torch

    from brainldm.train.compute_options import stage_device_dtype
    from brainldm.train.reconstruction.reconstruct import load_reference_pipeline, native_resolution, reconstruct_batch

    device, dtype = stage_device_dtype("device_check", cfg.device, cfg.dtype)
    start = time.perf_counter()
    pipe = load_reference_pipeline(folder, device, dtype)
    result = {"device": device.type, "dtype": cfg.dtype, "resolution": native_resolution(pipe),
              "load_s": round(time.perf_counter() - start, 2), "batches": {}}
    for batch in batches:
        z, c, uncond = reference_inputs(pipe, batch)
        items, samples = np.arange(batch), np.zeros(batch, np.int64)
        images = reconstruct_batch(pipe, z, c, uncond, items, samples, cfg)  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeats):
            images = reconstruct_batch(pipe, z, c, uncond, items, samples, cfg)  # numpy out: synchronised
        seconds = (time.perf_counter() - t0) / repeats
        entry = {"seconds_per_batch": seconds, "images_per_s": batch / seconds,
                 "image_shape": list(images.shape[1:]), "finite_fraction": float(np.isfinite(images).mean())}
        if device.type == "cuda":
            entry["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
        result["batches"][str(batch)] = entry
    return result


def reference_benchmark(params: Path, dry: bool, repeats: int) -> dict:
    """Part 2: the SD v1.4-architecture reference (random weights) timed through train/reconstruction/reconstruct.py."""
    from dataclasses import replace

    from brainldm.train.config import load_config
    from brainldm.train.reconstruction.reconstruct import ReconstructConfig

    cfg = load_config(ReconstructConfig, "reconstruct", params)
    device, dtype, batches = ("cpu", "float32", DRY_BATCHES) if dry else ("cuda", "float16", GPU_BATCHES)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = build_model(Path(tmp) / "sd14-random", dry)
        build_s = time.perf_counter() - start
        cfg = replace(cfg, model=str(folder), resolution=0, device=device, dtype=dtype,
                      steps=DRY_STEPS if dry else cfg.steps)
        result = time_reference(folder, cfg, batches, repeats)
    result.update(architecture=("SD v1.4 block layout at tiny widths" if dry else "SD v1.4 UNet + VAE")
                  + ", random weights", build_s=round(build_s, 2), steps=cfg.steps, strength=cfg.strength,
                  guidance=cfg.guidance, encode_mode=cfg.encode_mode, repeats=repeats)
    if not dry:
        add_flops(result)
    return result


def add_flops(result: dict) -> None:
    """TFLOP/s achieved per batch, against the device's dense fp16 peak when known (bench_runtime's table)."""
    import torch
    from bench_runtime import PEAK_TFLOPS

    flops = flops_per_image(result["steps"], result["strength"])
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS if k in name), None)
    result.update(flops=flops, peak_tflops_fp16_dense=peak)
    for entry in result["batches"].values():
        entry["achieved_tflops"] = entry["images_per_s"] * flops["per_image"] / 1e12
        entry["fraction_of_peak"] = entry["achieved_tflops"] / peak if peak else None


def backend_status() -> dict:
    """Per GPU backend: whether this machine has its packages, else "not run" and why."""
    import torch

    providers, ort_version = [], None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers, ort_version = onnxruntime.get_available_providers(), onnxruntime.__version__
    status = {}
    for backend in ("ort-cuda", "ort-trt"):
        wanted = ORT_PROVIDERS[backend][0]
        status[backend] = ({"status": "available"} if wanted in providers else
                           {"status": "not run", "reason": f"onnxruntime-gpu not installed: onnxruntime "
                                                           f"{ort_version} has no {wanted} (has {providers})"})
    status["tensorrt"] = ({"status": "available"} if importlib.util.find_spec("tensorrt") is not None else
                          {"status": "not run", "reason": "tensorrt not installed (the gpu extra's tensorrt package)"})
    if not torch.cuda.is_available():
        for entry in status.values():
            entry.update(status="not run", reason=entry.get("reason") or "no CUDA device")
    return status


def run_bench_runtime(backends: dict, steps: int, timeout: float) -> dict:
    """Part 3: bench/bench_runtime.py --gpu (SD v1.4 bundle, reference and every backend) where a backend can run."""
    if not any(entry["status"] == "available" for entry in backends.values()):
        return {"status": "not run", "reason": "none of its GPU backends can run here (see runtime_backends)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runtime.json"
        cmd = [sys.executable, str(REPO / "bench" / "bench_runtime.py"), "--gpu", "--steps", str(steps),
               "--workdir", str(Path(tmp) / "work"), "--out", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"bench_runtime.py --gpu ran past {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"status": "error", "exit_code": proc.returncode,
                    "output_tail": (proc.stdout + proc.stderr)[-OUTPUT_TAIL:]}
        return {"status": "ok", **json.loads(out.read_text())}


def _part(results: dict, name: str, out: Path, fn, *args) -> None:
    """Run one part into ``results[name]``; an exception becomes its recorded error. Writes ``out``."""
    start = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # a part's failure is a result to report, and the next part still runs
        results[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    results.setdefault("part_seconds", {})[name] = round(time.perf_counter() - start, 1)
    write_text_atomic(out, json.dumps(results, indent=1, sort_keys=True) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the results JSON (written after every part)")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: check that the script works")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="what pytest -m gpu runs (default: tests)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="steps, strength, guidance from here")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per size after one warm-up")
    parser.add_argument("--runtime-steps", type=int, default=50, help="DDIM steps of bench_runtime.py --gpu")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all parts together")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.params.is_file():
        print(f"error: params file not found: {args.params}", file=sys.stderr)
        return 1
    budget = Budget(args.budget_s)
    results = {"dry": args.dry, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _part(results, "environment", args.out, environment)
    _part(results, "gpu_tests", args.out, lambda: run_gpu_tests(args.tests, budget.left(300)))
    _part(results, "reference_sd14", args.out, reference_benchmark, args.params, args.dry, args.repeats)
    _part(results, "runtime_backends", args.out, backend_status)
    if args.dry:
        results["bench_runtime_gpu"] = {"status": "not run", "reason": "dry mode (CPU)"}
    else:
        _part(results, "bench_runtime_gpu", args.out, lambda: run_bench_runtime(
            results["runtime_backends"], args.runtime_steps, budget.left(600)))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("status") == "error"]
    results["failed_parts"] = failed
    write_text_atomic(args.out, json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: " + (f"failed parts {failed}" if failed else "every part ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
