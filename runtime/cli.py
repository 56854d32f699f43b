"""``brainldm-runtime``: reconstruct images from raw betas with an exported bundle.

    brainldm-runtime reconstruct --bundle DIR --betas FILE --out DIR [--backend ort-cpu]
        [--batch-size N] [--samples K] [--seed S] [--threads T] [--fp16] [--overwrite]

Input: ``.npy`` (betas (n, V) only; one item per row, the bundle must have one session)
or ``.npz`` / ``.h5`` with ``betas`` and optional ``session`` (n,) and ``group`` (n,)
(trials sharing a group id, e.g. an image's repeats, are averaged into one item).
Output: ``item{i:04d}_s{k}.png`` per (item, sample), then ``index.csv`` (item, group id,
sample, file) and ``run.json``. Each PNG is written atomically as soon as its batch is
done, so an interrupted run leaves only complete files; a folder that already holds
results is refused unless ``--overwrite``. Exit codes: 0 ok, 1 bad input, 2 usage.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from brainldm.runtime.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from brainldm.runtime.backends import BACKENDS
from brainldm.runtime.reconstructor import Reconstructor, to_uint8

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


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding results (unless overwrite, which removes just those files)."""
    existing = [p for pattern in RESULT_PATTERNS for p in out.glob(pattern)] if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"output folder {out} already holds results ({len(existing)} files, e.g. {existing[0].name}); "
                         "pass --overwrite to replace them or choose another --out")
    for p in existing:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_reconstruct(args: argparse.Namespace) -> Path:
    """The `reconstruct` command; returns the output folder."""
    data = read_input(Path(args.betas))
    rec = Reconstructor(args.bundle, backend=args.backend, threads=args.threads, fp16=args.fp16)
    samples = int(rec.generation["samples"] if args.samples is None else args.samples)
    seed = int(rec.generation["seed"] if args.seed is None else args.seed)
    decoded = rec.decode(data["betas"], data["session"], data["group"], args.batch_size)
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    rows = write_pngs(rec, decoded, samples, seed, args.batch_size, out)
    with atomic_path(out / "index.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item", "group", "sample", "file"])
        writer.writerows(rows)
    run_info = {"bundle": str(args.bundle), "betas": str(args.betas), "backend": args.backend, "fp16": args.fp16,
                "samples": samples, "seed": seed, "n_items": len(decoded.ids), "grouped": data["group"] is not None}
    write_text_atomic(out / "run.json", json.dumps(run_info, indent=2, sort_keys=True))
    return out


def write_pngs(rec: Reconstructor, decoded, samples: int, seed: int, batch_size: int, out: Path) -> list[tuple]:
    """Generate batch by batch, writing each PNG atomically; returns the index rows.

    A backend failure mid-way becomes a ``BatchFailedError`` that says how many complete
    PNGs are already in ``out`` (no index.csv is written for an incomplete run).
    """
    rows = []
    try:
        for items, sample_idx, images in rec.iter_batches(decoded, samples, seed, batch_size=batch_size,
                                                          progress=True):
            for i, s, image in zip(items, sample_idx, to_uint8(images)):
                name = f"item{i:04d}_s{s}.png"
                write_bytes_atomic(out / name, png_bytes(image))
                rows.append((int(i), int(decoded.ids[i]), int(s), name))
    except Exception as exc:  # onnxruntime's errors derive from Exception only; KeyboardInterrupt passes
        raise BatchFailedError(f"reconstruction failed after {len(rows)} of {len(decoded.ids) * samples} images "
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
    rec.add_argument("--seed", type=int, default=None, help="noise seed (default: the bundle's)")
    rec.add_argument("--threads", type=int, default=0,
                     help="CPU threads (0 = all cores); ort-cpu splits each batch over them")
    rec.add_argument("--fp16", action="store_true", help="ONNX backends: use the bundle's fp16 UNet/VAE graphs")
    rec.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run_reconstruct(args)
    except (ValueError, FileNotFoundError, BatchFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
