"""``brainldm-runtime``: reconstruct images from raw betas with an exported bundle.

    brainldm-runtime reconstruct --bundle DIR --betas FILE --out DIR [--backend ort-cpu]
        [--batch-size N] [--samples K] [--seed S] [--threads T] [--fp16] [--overwrite]
        [--ray [ADDRESS] [--actors N] [--actor-cpus C] [--actor-gpus G]]

Input: ``.npy`` (betas (n, V) only; one item per row, the bundle must have one session)
or ``.npz`` / ``.h5`` with ``betas`` and optional ``session`` (n,) and ``group`` (n,)
(trials sharing a group id, e.g. an image's repeats, are averaged into one item).
Output: ``item{i:04d}_s{k}.png`` per (item, sample), then ``index.csv`` (item, group id,
sample, file) and ``run.json``. Each PNG is written atomically as soon as its batch is
done, so an interrupted run leaves only complete files; a folder that already holds
results is refused unless ``--overwrite``. Exit codes: 0 ok, 1 bad input, 2 usage, 130 interrupted.
``--ray`` runs the generation on Ray Data actors (runtime/ray_batch.py, the ``ray`` extra;
Ray is imported only then), with the same inputs, checks and byte-identical outputs.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from brainldm.runtime.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from brainldm.runtime.backends import BACKENDS
from brainldm.runtime.reconstructor import PredictedTargets, Reconstructor, to_uint8

INPUT_KEYS = ("betas", "session", "group")
RESULT_PATTERNS = ("item*_s*.png", "index.csv", "run.json")


def read_input(path: Path) -> dict[str, np.ndarray | None]:
    """{"betas", "session", "group"} from .npy / .npz / .h5 (missing optional keys are None)."""
    if not path.is_file():
        raise FileNotFoundError(f"betas file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"betas": np.load(path, allow_pickle=False), "session": None, "group": None}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data = {k: (f[k] if k in f.files else None) for k in INPUT_KEYS}
        elif suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                data = {k: (np.asarray(f[k]) if k in f else None) for k in INPUT_KEYS}
        else:
            raise ValueError(f"{path}: unsupported input type {suffix!r}; expected .npy, .npz or .h5")
    except (OSError, ValueError, EOFError) as exc:  # np.load raises EOFError on an empty .npy
        if "unsupported input type" in str(exc):
            raise
        raise ValueError(f"{path}: could not read ({exc})") from exc
    if data["betas"] is None:
        raise ValueError(f"{path}: has no 'betas' array; expected keys betas (n, V), optional session (n,), group (n,)")
    return data


def png_bytes(image: np.ndarray) -> bytes:
    """(R, R, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def check_out_path(out: Path, bundle: Path) -> None:
    """Refuse an ``out`` that cannot become a results folder, before any work and without creating it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder (new, or one to add results to)")
    resolved, bundle = out.resolve(), Path(bundle).resolve()
    if resolved == bundle or bundle in resolved.parents:
        raise ValueError(f"--out {out} is inside the bundle {bundle}; expected a folder outside it "
                         "(the bundle's files are hashed in its manifest)")
    ancestor = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is a file, so no folder can be made below it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: no permission to write in {ancestor}; expected a writable folder")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding results (unless overwrite, which removes just those files)."""
    existing = [p for pattern in RESULT_PATTERNS for p in out.glob(pattern)] if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"output folder {out} already holds results ({len(existing)} files, e.g. {existing[0].name}); "
                         "pass --overwrite to replace them or choose another --out")
    try:
        for p in existing:
            p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot prepare the output folder ({exc.strerror or exc})") from exc


@dataclass(frozen=True)
class Prepared:
    """A validated run: the reconstructor, its predicted items, the samples per item and the noise seed."""

    rec: Reconstructor
    predicted: PredictedTargets
    samples: int
    seed: int
    grouped: bool


def prepare(args: argparse.Namespace) -> Prepared:
    """Read and check every input (output path, betas file, bundle, backend); decode the betas into latents."""
    check_out_path(Path(args.out), Path(args.bundle))
    data = read_input(Path(args.betas))
    rec = Reconstructor(args.bundle, backend=args.backend, threads=args.threads, fp16=args.fp16)
    samples = int(rec.generation["samples"] if args.samples is None else args.samples)
    seed = int(rec.generation["seed"] if args.seed is None else args.seed)
    predicted = rec.predict_targets(data["betas"], data["session"], data["group"], args.batch_size)
    return Prepared(rec, predicted, samples, seed, data["group"] is not None)


def write_index(args: argparse.Namespace, run: Prepared, rows: list[tuple], out: Path) -> None:
    """``index.csv`` (rows of item, group id, sample, file) then ``run.json``, each atomically."""
    with atomic_path(out / "index.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "group", "sample", "file"])
        writer.writerows(rows)
    run_info = {"bundle": str(args.bundle), "betas": str(args.betas), "backend": args.backend, "fp16": args.fp16,
                "samples": run.samples, "seed": run.seed, "n_items": len(run.predicted.ids), "grouped": run.grouped}
    write_text_atomic(out / "run.json", json.dumps(run_info, indent=2, sort_keys=True))


def run_reconstruct(args: argparse.Namespace) -> Path:
    """The `reconstruct` command; returns the output folder."""
    if args.ray is not None:
        from brainldm.runtime import ray_batch  # imports Ray lazily: only --ray needs the extra

        return ray_batch.run_ray(args)
    run = prepare(args)
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    rows = write_pngs(run.rec, run.predicted, run.samples, run.seed, args.batch_size, out)
    write_index(args, run, rows, out)
    return out


def png_name(item: int, sample: int) -> str:
    """The output file of one (item, sample)."""
    return f"item{item:04d}_s{sample}.png"


def write_pngs(rec: Reconstructor, predicted, samples: int, seed: int, batch_size: int, out: Path) -> list[tuple]:
    """Generate batch by batch, writing each PNG atomically; returns the index rows.

    A backend failure mid-way becomes a ``BatchFailedError`` that says how many complete
    PNGs are already in ``out`` (no index.csv is written for an incomplete run).
    """
    rows = []
    try:
        for items, sample_idx, images in rec.iter_batches(predicted, samples, seed, batch_size=batch_size,
                                                          progress=True):
            for i, s, image in zip(items, sample_idx, to_uint8(images)):
                name = png_name(i, s)
                write_bytes_atomic(out / name, png_bytes(image))
                rows.append((int(i), int(predicted.ids[i]), int(s), name))
    except Exception as exc:  # onnxruntime's errors derive from Exception only; KeyboardInterrupt passes
        raise BatchFailedError(f"reconstruction failed after {len(rows)} of {len(predicted.ids) * samples} images "
                               f"({type(exc).__name__}: {exc}); the {len(rows)} PNGs in {out} are complete, "
                               "no index.csv was written; rerun with --overwrite") from exc
    return rows


class BatchFailedError(RuntimeError):
    """A batch failed in the backend after some PNGs were written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainldm-runtime", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("reconstruct", help="raw betas -> PNG reconstructions")
    rec.add_argument("--bundle", required=True, help="bundle folder written by the export stage")
    rec.add_argument("--betas", required=True, help=".npy (betas) or .npz/.h5 (betas, optional session, group)")
    rec.add_argument("--out", required=True, help="output folder for the PNGs")
    rec.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    rec.add_argument("--batch-size", type=_positive, default=8, help="(item, sample) pairs per UNet batch")
    rec.add_argument("--samples", type=_positive, default=None, help="samples per item (default: the bundle's)")
    rec.add_argument("--seed", type=_non_negative, default=None, help="noise seed (default: the bundle's)")
    rec.add_argument("--threads", type=_non_negative, default=0,
                     help="CPU threads (0 = all cores); ort-cpu splits each batch over them")
    rec.add_argument("--fp16", action="store_true", help="ONNX backends: use the bundle's fp16 UNet/VAE graphs")
    rec.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    _add_ray_options(rec)
    return parser


EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130  # the shell's code for a run ended by SIGINT (128 + 2)
RAY_LOCAL = "local"  # --ray without an address: start a Ray instance on this machine
RAY_ONLY_OPTIONS = ("actors", "actor_cpus", "actor_gpus")


def _add_ray_options(rec: argparse.ArgumentParser) -> None:
    ray = rec.add_argument_group("distributed (Ray Data; needs the ray extra)")
    ray.add_argument("--ray", nargs="?", const=RAY_LOCAL, default=None, metavar="ADDRESS",
                     help="generate on Ray actors: no ADDRESS starts a local Ray instance, "
                          "'auto' or host:port connects to a running cluster")
    ray.add_argument("--actors", type=_positive, default=None,
                     help="actors, each holding one loaded bundle (default: as many as the cluster's resources fit)")
    ray.add_argument("--actor-cpus", type=_positive_float, default=None,
                     help="CPUs reserved per actor (default 1); --threads 0 then means this many threads")
    ray.add_argument("--actor-gpus", type=_non_negative_float, default=None,
                     help="GPUs reserved per actor (default 0; 1 with --backend ort-cuda)")


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ray is None and any(getattr(args, name) is not None for name in RAY_ONLY_OPTIONS):
        parser.error("--actors, --actor-cpus and --actor-gpus need --ray")
    try:
        out = run_reconstruct(args)
    except (ValueError, FileNotFoundError, BatchFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"interrupted: the PNGs already in {args.out} are complete; no index.csv was written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    # `python -m`: run the importable module's main, whose error classes are the ones ray_batch raises
    from brainldm.runtime.cli import main as importable_main

    sys.exit(importable_main())
