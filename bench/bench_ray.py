"""Benchmark: ``reconstruct --ray`` (Ray Data actors) vs the single-process CLI at equal cores.

One run, one bundle, one input file, three configurations, each timed end to end through
the CLI's ``main`` (read the betas, load and hash-verify the bundle, decode, generate,
write the PNGs, index.csv and run.json):

- ``single``: the single-process CLI with ``--threads`` CPU threads (default 2);
- ``ray-1`` / ``ray-2``: ``--ray`` with 1 and 2 single-threaded actors (``--actor-cpus 1
  --threads 1``) on one local Ray instance (``num_cpus`` = the single side's threads).

Ray is started once, before any timing, as a cluster is long-lived; its start-up is reported
apart (``ray_init_s``); each Ray run includes its actors' start-up and bundle loading. Runs
are interleaved (single, ray-1, ray-2, then again) and the best of ``--repeats`` counts.
Every Ray run's files are compared byte for byte with the single run's. Ray's overhead at
equal cores is ``1 - images/s(ray-2) / images/s(single)`` (goal: at most 15 %).
Writes bench/results/ray.json.

    python bench/bench_ray.py                          # small-LDM architecture, random weights, 48 images
    python bench/bench_ray.py --model tiny             # the tests' tiny model
    python bench/bench_ray.py --bundle bundles/sim-nsd-ours
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_bundles import REPO, build_small_ldm_bundle, tiny_bundle
from bench_runtime import bench_inputs

DEFAULT_OUT = REPO / "bench" / "results" / "ray.json"
OVERHEAD_GOAL = 0.15
CONFIGS = ("single", "ray-1", "ray-2")


def build_bundle(args, root: Path) -> Path:
    """--bundle, or the tiny / small-LDM bundle exported under ``root``."""
    if args.bundle is not None:
        return args.bundle
    if args.model == "tiny":
        return tiny_bundle(root, args.steps)
    return build_small_ldm_bundle(root, args.steps, REPO / "params.yaml")


def write_betas(bundle: Path, items: int, path: Path) -> Path:
    """``items`` single-trial items of the bundle's first session as an .npz (betas, session)."""
    _, betas, session = bench_inputs(bundle, items)
    np.savez(path, betas=betas, session=session)
    return path


def cli_argv(args, bundle: Path, betas: Path, out: Path, config: str) -> list[str]:
    argv = ["reconstruct", "--bundle", str(bundle), "--betas", str(betas), "--out", str(out), "--overwrite",
            "--samples", str(args.samples), "--batch-size", str(args.batch_size)]
    if config == "single":
        return [*argv, "--threads", str(args.threads)]
    return [*argv, "--threads", "1", "--ray", "--actors", config.split("-")[1], "--actor-cpus", "1"]


def time_config(argv: list[str]) -> float:
    """Seconds of one CLI run (exit code 0 required)."""
    from brainldm.runtime import cli

    start = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"error: the benchmarked command failed (exit {code}): {' '.join(argv)}")
    return seconds


def same_files(a: Path, b: Path) -> bool:
    """Whether the two output folders hold the same PNGs and index.csv, byte for byte."""
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".png" or p.name == "index.csv")
    return names == sorted(p.name for p in b.iterdir() if p.suffix == ".png" or p.name == "index.csv") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def start_ray(cpus: int) -> float:
    """A local Ray instance with ``cpus`` CPUs (the --ray runs reuse it); returns its start-up seconds."""
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    return time.perf_counter() - start


def measure(args, bundle: Path, betas: Path, root: Path) -> tuple[dict, bool]:
    """{config: [seconds per repeat]} after one untimed warm-up run each; and whether all outputs agree."""
    outs = {c: root / f"out-{c}" for c in CONFIGS}
    for config in CONFIGS:  # warm-up: page cache, ORT kernel selection, Ray's worker pool
        time_config(cli_argv(args, bundle, betas, outs[config], config))
    seconds = {c: [] for c in CONFIGS}
    identical = True
    for _ in range(args.repeats):
        for config in CONFIGS:
            seconds[config].append(time_config(cli_argv(args, bundle, betas, outs[config], config)))
            identical &= config == "single" or same_files(outs["single"], outs[config])
    return seconds, identical


def summarise(args, seconds: dict, n_images: int) -> dict:
    best = {c: min(s) for c, s in seconds.items()}
    rate = {c: n_images / best[c] for c in CONFIGS}
    ratios = {f"{c}/single": rate[c] / rate["single"] for c in CONFIGS[1:]}
    ratios["ray-2/ray-1"] = rate["ray-2"] / rate["ray-1"]
    overhead = 1.0 - ratios["ray-2/single"]
    return {"configs": {c: {"seconds": seconds[c], "best_s": best[c], "images_per_s": rate[c]} for c in CONFIGS},
            "ratios": ratios, "ray_overhead_at_equal_cores": overhead, "overhead_goal": OVERHEAD_GOAL,
            "meets_goal": overhead <= OVERHEAD_GOAL}


def report(result: dict) -> None:
    labels = {"single": f"single process, {result['threads']} threads", "ray-1": "Ray, 1 actor x 1 thread",
              "ray-2": "Ray, 2 actors x 1 thread"}
    print(f"{result['images']} images, batch {result['batch_size']}, best of {result['repeats']}; "
          f"Ray start-up {result['ray_init_s']:.1f} s (not counted)")
    print(f"{'configuration':32s} {'images/s':>9s} {'vs single':>10s}")
    for c in CONFIGS:
        rate = result["configs"][c]["images_per_s"]
        print(f"{labels[c]:32s} {rate:9.2f} {rate / result['configs']['single']['images_per_s']:10.2f}")
    verdict = "meets" if result["meets_goal"] else "misses"
    print(f"Ray overhead at equal cores: {100 * result['ray_overhead_at_equal_cores']:.1f} % "
          f"({verdict} the {100 * OVERHEAD_GOAL:.0f} % goal); outputs identical: {result['identical_files']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to use (default: one built here)")
    parser.add_argument("--model", choices=("tiny", "small-ldm"), default="small-ldm", help="model built here")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the bundle built here")
    # enough work (~15 s per run here) that the actors' start-up (~2 s per run) is not all one measures
    parser.add_argument("--items", type=int, default=24, help="items (one trial each)")
    parser.add_argument("--samples", type=int, default=2, help="samples per item")
    parser.add_argument("--batch-size", type=int, default=4, help="(item, sample) pairs per batch, every side")
    parser.add_argument("--threads", type=int, default=2, help="threads of the single side = Ray's CPUs")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        root = Path(tmp)
        bundle = build_bundle(args, root)
        betas = write_betas(bundle, args.items, root / "betas.npz")
        ray_init_s = start_ray(args.threads)
        seconds, identical = measure(args, bundle, betas, root)
        steps = json.loads((bundle / "manifest.json").read_text())["generation"]["steps"]
    result = {"bundle": str(args.bundle) if args.bundle else f"{args.model} architecture, random weights",
              "steps": steps, "images": args.items * args.samples, "batch_size": args.batch_size,
              "threads": args.threads, "repeats": args.repeats, "ray_init_s": ray_init_s, "cpus": os.cpu_count(),
              "load_average_before": load_before, "identical_files": identical,
              **summarise(args, seconds, args.items * args.samples)}
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
