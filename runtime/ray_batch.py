"""Distributed batch reconstruction on Ray Data: ``brainldm-runtime reconstruct ... --ray [ADDRESS]``.

The driver (this process) checks every input exactly as the single-process CLI does and
decodes the betas into latents (cli.prepare), then turns the work into one row per
(item, sample) and runs the rows through ``map_batches(ReconstructActor, ...)``: a pool of
Ray actors, each holding one ``Reconstructor`` (bundle loaded and hash-verified once per
actor), each writing its PNGs atomically into ``--out`` and returning their names. The
driver writes ``index.csv`` and ``run.json`` last, as the CLI does. Noise is keyed by
(seed, item, sample), so every PNG is byte-identical to the single-process CLI's.

Faults: an actor process that dies is restarted by Ray and its batch retried (bounded by
MAX_ACTOR_RESTARTS / MAX_TASK_RETRIES); a retried batch rewrites the same names, and the
temporary files of killed writers are swept at the end. An interrupted or failed run
leaves only complete PNGs and no index.csv. Ray is imported only here, and only when
--ray is used (the ``ray`` extra). Bundle and output paths must be the same on every node
(a shared filesystem) when the actors run on other machines.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import logging
import math
import re
import socket
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brainldm.runtime.atomic import write_bytes_atomic
from brainldm.runtime.cli import (RAY_LOCAL, BatchFailedError, Prepared, check_out_dir, png_bytes, png_name, prepare,
                                  write_index)
from brainldm.runtime.reconstructor import Reconstructor, to_uint8

# A batch whose actor dies is retried on a restarted actor; bounded so that an input that
# kills every actor (e.g. out of memory) fails the run instead of looping forever.
MAX_ACTOR_RESTARTS = 3
MAX_TASK_RETRIES = 3
DEFAULT_ACTOR_CPUS = 1.0
DEFAULT_ACTOR_GPUS = 0.0
# After a failure or interrupt, how long to wait for the actors' resources to come back (their
# processes gone) before sweeping temporary files that a killed writer may have left.
RELEASE_TIMEOUT_S = 60.0
RELEASE_POLL_S = 0.1
RESOURCE_KEYS = ("CPU", "GPU")
HOST_PORT = re.compile(r"(?P<host>[^:/\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)")  # a GCS address, not ray://...
CONNECT_TIMEOUT_S = 10.0
FIT_TOLERANCE = 1e-9  # fractional resources: 1.0 / 0.1 must fit 10 actors, not 9.999...
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: \S")  # "RuntimeError: ..." at the start of a traceback line
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
TEMP_PNG_PATTERN = ".item*_s*.png.*"  # atomic_path's temporary name of an item PNG (a hidden file)
# Ray Data console chatter, dropped from the console only (Ray's session ray-data.log keeps it all):
CONSOLE_LEVELS = {
    "ray.data._internal.progress": logging.ERROR,  # "progress bars disabled": the driver draws its own
    "ray.data._internal.execution.streaming_executor": logging.WARNING,  # per-run start/finish lines
    # "stack trace below" advice and the traces: the driver reports the original error in one line
    "ray.data.exceptions": logging.CRITICAL + 1,
}


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= CONSOLE_LEVELS.get(record.name, logging.NOTSET)


CONSOLE_FILTER = _ConsoleFilter()


class ReconstructActor:
    """Ray Data callable class: one ``Reconstructor`` per actor process, reused for every batch.

    Args:
        bundle: absolute bundle folder (the same path on every node); loaded and hash-verified once.
        backend, threads, fp16: as ``Reconstructor``.
        z: (m, C, h, w) float32 latents x scaling; c: (m, T, D) float32 text states (the driver's brain decoding).
        seed: the noise seed; out: absolute output folder (the same path on every node).
    """

    def __init__(self, bundle: str, backend: str, threads: int, fp16: bool, z: np.ndarray, c: np.ndarray,
                 seed: int, out: str):
        self.rec = Reconstructor(bundle, backend=backend, threads=threads, fp16=fp16)
        self.z, self.c, self.seed, self.out = z, c, seed, Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"item", "sample"}: (B,) int64 -> the same plus "file" (B,) str, each PNG written atomically."""
        items, samples = batch["item"].astype(np.int64), batch["sample"].astype(np.int64)
        images = to_uint8(self.rec.generate(self.z[items], self.c[items], items, samples, self.seed))
        names = [png_name(int(i), int(s)) for i, s in zip(items, samples)]
        for name, image in zip(names, images):
            write_bytes_atomic(self.out / name, png_bytes(image))
        return {"item": items, "sample": samples, "file": np.array(names)}


def run_ray(args: argparse.Namespace) -> Path:
    """The `reconstruct` command on Ray; returns the output folder (the CLI's files, the CLI's errors)."""
    # every input is checked here, before Ray starts or any file is written; the driver only predicts targets,
    # so its sessions are dropped (memory, or a GPU, that a co-located actor needs)
    run = dataclasses.replace(prepare(args), rec=None)
    ray = _import_ray()
    started = connect(ray, args.ray)
    out = Path(args.out)
    try:
        actors = actor_count(ray, args, _n_batches(run, args.batch_size))
        check_out_dir(out, args.overwrite)
        try:
            rows = _generate(ray, run, args, out, actors)
        finally:
            sweep_temp_files(out)  # _generate returns or raises once no actor can write any more
    finally:
        if started:
            ray.shutdown()
    write_index(args, run, rows, out)
    return out


def _import_ray():
    """``ray`` with ``ray.data`` loaded. The one place the runtime imports Ray, by name at run time: the
    static import check (tests/runtime/test_no_torch.py) keeps refusing ``import ray`` anywhere else."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--ray needs Ray, which is not installed; install the extra: pip install 'brainldm[ray]'")
    ray = importlib.import_module("ray")
    importlib.import_module("ray.data")
    return ray


def connect(ray, address: str) -> bool:
    """Start a local Ray instance (address "local") or connect to a cluster ("auto", host:port).

    Returns whether this call started Ray (then the caller shuts it down); an already
    initialised Ray (e.g. a test's) is reused. Worker output is not forwarded: a failing
    batch reaches the driver as an exception, the rest stays in Ray's session logs.
    """
    started = not ray.is_initialized()
    if started:
        options = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address == RAY_LOCAL:
            options["include_dashboard"] = False
        try:
            _check_reachable(address)
            ray.init(address=address, **options)
        except (OSError, RuntimeError, ValueError) as exc:  # ConnectionError and TimeoutError are OSErrors
            raise ValueError(f"cannot start or reach Ray at {address!r} ({_first_line(exc)})") from exc
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and CONSOLE_FILTER not in handler.filters:
            handler.addFilter(CONSOLE_FILTER)  # the console handlers; the session log file is no stream
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return started


def _check_reachable(address: str) -> None:
    """A host:port must accept a TCP connection: Ray itself retries an unreachable one for minutes."""
    match = HOST_PORT.fullmatch(address)
    if match:
        with socket.create_connection((match["host"].strip("[]"), int(match["port"])), timeout=CONNECT_TIMEOUT_S):
            pass


def actor_count(ray, args: argparse.Namespace, n_batches: int) -> int:
    """--actors, or as many actors as the cluster's CPUs/GPUs fit (at most one per batch); >= 1.

    A pool the cluster cannot hold would wait for resources forever: refused with one line.
    """
    need = {"CPU": _actor_cpus(args), "GPU": _actor_gpus(args)}
    have = {key: float(ray.cluster_resources().get(key, 0.0)) for key in RESOURCE_KEYS}
    fit = min(math.floor(have[k] / need[k] + FIT_TOLERANCE) for k in RESOURCE_KEYS if need[k] > 0)
    wanted = args.actors if args.actors is not None else max(1, min(fit, n_batches))
    if wanted > fit:
        raise ValueError(f"{wanted} actor(s) need {wanted * need['CPU']:g} CPUs and {wanted * need['GPU']:g} GPUs; "
                         f"the Ray cluster has {have['CPU']:g} CPUs and {have['GPU']:g} GPUs "
                         "(lower --actors, --actor-cpus or --actor-gpus, or add nodes)")
    return wanted


def _actor_cpus(args) -> float:
    return DEFAULT_ACTOR_CPUS if args.actor_cpus is None else float(args.actor_cpus)


def _actor_gpus(args) -> float:
    return DEFAULT_ACTOR_GPUS if args.actor_gpus is None else float(args.actor_gpus)


def _n_batches(run: Prepared, batch_size: int) -> int:
    return math.ceil(len(run.predicted.ids) * run.samples / batch_size)


def _dataset(ray, run: Prepared, args: argparse.Namespace, out: Path, actors: int):
    """The (item, sample) rows, item-major as the CLI's batches, mapped by a pool of ``actors``."""
    items, samples = np.divmod(np.arange(len(run.predicted.ids) * run.samples), run.samples)
    rows = [{"item": int(i), "sample": int(s)} for i, s in zip(items, samples)]
    # one input block per batch, so batches never wait for rows from another block
    dataset = ray.data.from_items(rows, override_num_blocks=_n_batches(run, args.batch_size))
    cpus = _actor_cpus(args)
    kwargs = {"bundle": str(Path(args.bundle).resolve()), "backend": args.backend, "fp16": args.fp16,
              # --threads 0 ("all cores") means the actor's reserved CPUs: actors share a node
              "threads": args.threads or max(1, int(cpus)), "z": run.predicted.z, "c": run.predicted.c,
              "seed": run.seed, "out": str(out.resolve())}
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as (deprecated) ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(ReconstructActor, fn_constructor_kwargs=kwargs, batch_size=args.batch_size,
                                   batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                   num_cpus=cpus, num_gpus=_actor_gpus(args), max_restarts=MAX_ACTOR_RESTARTS,
                                   max_task_retries=MAX_TASK_RETRIES)


def _generate(ray, run: Prepared, args: argparse.Namespace, out: Path, actors: int) -> list[tuple]:
    """Run the pool, showing progress; returns the CLI's index rows (item, group, sample, file), sorted.

    A failing batch becomes a ``BatchFailedError``, a KeyboardInterrupt passes; either only
    once the pool's actors are gone, so that no writer outlives the driver's cleanup.
    """
    total = len(run.predicted.ids) * run.samples
    free = _free_resources(ray)
    done: dict[tuple[int, int], str] = {}
    failure, interrupted = None, False
    try:
        _collect(_dataset(ray, run, args, out, actors), total, done)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:  # Ray's errors derive from Exception
        failure = (f"reconstruction failed after {len(done)} of {total} images on Ray ({_root_cause(exc)}); "
                   f"the PNGs in {out} are complete, no index.csv was written; rerun with --overwrite")
    if interrupted or failure:
        # outside the except blocks: the failed run's frames, which hold the pool's actors, are gone
        gc.collect()
        wait_for_release(ray, free)
    if interrupted:
        raise KeyboardInterrupt  # the complete PNGs stay, no index.csv, as in the single-process CLI
    if failure:
        raise BatchFailedError(failure)
    if len(done) != total:
        raise BatchFailedError(f"Ray returned {len(done)} of {total} images; no index.csv was written")
    return [(i, int(run.predicted.ids[i]), s, done[(i, s)]) for i, s in sorted(done)]


def _collect(dataset, total: int, done: dict[tuple[int, int], str]) -> None:
    """Consume the pool's output batches into ``done`` ((item, sample) -> file), with a progress bar."""
    with contextlib.closing(iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))) as batches:
        with tqdm(total=total, desc="reconstruct", unit="image") as bar:
            for batch in batches:
                done.update(((int(i), int(s)), str(f)) for i, s, f in zip(batch["item"], batch["sample"],
                                                                         batch["file"]))
                bar.update(len(batch["file"]))


def _free_resources(ray) -> dict[str, float]:
    free = ray.available_resources()
    return {key: float(free.get(key, 0.0)) for key in RESOURCE_KEYS}


def wait_for_release(ray, before: dict[str, float], timeout_s: float = RELEASE_TIMEOUT_S) -> bool:
    """Wait until the cluster's free CPUs/GPUs are back to ``before`` (the pool's actors have exited).

    Returns False on timeout (other jobs may hold resources); bounded, never raises.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(free >= before[key] for key, free in _free_resources(ray).items()):
            return True
        time.sleep(RELEASE_POLL_S)
    return False


def sweep_temp_files(out: Path) -> list[Path]:
    """Remove temporary PNGs (hidden ``.item*_s*.png.*``) that killed writers left in ``out``; returns them."""
    leftovers = sorted(out.glob(TEMP_PNG_PATTERN)) if out.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _root_cause(exc: BaseException) -> str:
    """One line naming the original error of a Ray error, whose text holds the worker's traceback.

    A UDF's exception reaches the driver only as that text: its first ``Name: message`` line
    is the innermost, original exception. Else the innermost ``cause``'s first line.
    """
    worker_text = str(exc) if type(exc).__module__.split(".")[0] == "ray" else ""
    for line in ANSI_ESCAPE.sub("", worker_text).splitlines():
        if EXCEPTION_LINE.match(line):
            return line.strip()
    seen = set()
    while isinstance(getattr(exc, "cause", None) or exc.__cause__, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
