"""Multi-process training plumbing shared by ``fit`` and ``train_ldm``: torchrun (DDP) or one process.

``torchrun --nproc_per_node N -m brainldm.train.<stage> ...`` starts N processes and sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each;
``join_process_group`` then joins them (gloo on CPU, nccl on CUDA). Without torchrun (no
``WORLD_SIZE``, or ``WORLD_SIZE=1``) no process group exists and every helper here is the
identity or a no-op: the single-process path (dvc.yaml's default) computes exactly what it
computed before DDP existed, bit for bit.

How the stages split work: every rank draws the same global minibatch from the same seeded
generator and keeps its rows ``rank::world`` (``shard``), so the global batch, the number of
steps and the random stream are those of one process; DistributedDataParallel (``wrap``)
averages the gradients. Rank 0 alone writes outputs (``is_main``).
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

DEVICES = ("cpu", "cuda", "auto")


def _env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"environment {name}={text!r}: expected an integer >= {minimum} (torchrun sets it)")
    return value


def launched_world_size() -> int:
    """Processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1, 1)


def world_size() -> int:
    """Processes in this run's process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    return dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0, 0)


def is_main() -> bool:
    """Whether this process writes outputs and prints (rank 0; always true without torchrun)."""
    return rank() == 0


def resolve_device(device: str, key: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (cuda when available) -> a torch.device; ``key`` names the params
    entry in errors. Under torchrun a CUDA device is this rank's GPU, ``cuda:LOCAL_RANK``."""
    if device not in DEVICES:
        raise ValueError(f"{key}: got {device!r}, expected 'cpu', 'cuda' or 'auto'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: 'cuda' requested but no CUDA device is available")
    if device == "cpu" or launched_world_size() == 1:
        return torch.device(device)
    local = _env_int("LOCAL_RANK", 0, 0)
    if local >= torch.cuda.device_count():
        raise ValueError(f"{key}: local rank {local} needs cuda:{local} but this host has "
                         f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node")
    torch.cuda.set_device(local)  # nccl's collectives run on the current device
    return torch.device("cuda", local)


def join_process_group(device: torch.device) -> None:
    """Under torchrun, join its process group (nccl for CUDA, gloo for CPU) once per process and
    leave it at exit; nothing without torchrun or when the caller already initialised a group.
    Kept for the process's life: a second init after a destroy races on the rendezvous store
    (seen as 'Gloo connectFullMesh failed' when one script fits several decoders)."""
    if launched_world_size() == 1 or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Discard stdout on torchrun's ranks > 0, so that a stage prints its summary line once
    (stderr, where errors go, is kept)."""
    with contextlib.redirect_stdout(io.StringIO()) if not is_main() else contextlib.nullcontext():
        yield


def shard(rows: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global minibatch, rows ``rank::world`` (sizes differ by at most one);
    ``rows`` itself in one process."""
    return rows if world_size() == 1 else rows[rank()::world_size()]


def check_shardable(batch_size: int, key: str) -> None:
    """A clear error unless ``batch_size`` splits into equal shards over torchrun's processes (then the
    mean of the ranks' mean losses is the global batch's, and so are the averaged gradients)."""
    n = launched_world_size()
    if batch_size % n:
        raise ValueError(f"{key}: {batch_size} is not divisible by the {n} torchrun processes")


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` itself in one process; under DDP a DistributedDataParallel around it, which
    broadcasts rank 0's parameters and buffers now and averages gradients in every backward."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _comm_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks in float64 (the same result on every rank); ``values`` unchanged
    in one process."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return total.tolist()


def mean_across(value: "float | torch.Tensor") -> float:
    """Mean over ranks of a scalar (e.g. each rank's minibatch loss); ``float(value)`` in one process."""
    value = value.detach() if isinstance(value, torch.Tensor) else value  # a float, not a graph node
    return float(value) if world_size() == 1 else sum_across([float(value)])[0] / world_size()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. stop training now), so that no rank leaves a loop
    the others stay in; ``flag`` in one process."""
    if world_size() == 1:
        return flag
    decided = torch.tensor([int(flag)], device=_comm_device())
    dist.broadcast(decided, src=0)
    return bool(decided.item())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Overwrite every buffer (e.g. BatchNorm running statistics, which each rank updated from its
    own shard) with rank 0's, so every rank holds the model rank 0 saves; no-op in one process."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` in one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
