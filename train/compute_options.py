"""The ``device`` and ``dtype`` options of the diffusion stages (reconstruct, parity's reference side).

``device`` is cpu | cuda | auto (cuda when one is available), resolved by the project's one
``resolve_device`` (train/distributed.py; the decode stage, which has no dtype, calls it
directly). ``dtype`` is float32 | float16 | bfloat16, the half types on CUDA only: CPU
half-precision kernels are slow and no output was ever made with them. CPU float32, the
default, computes exactly what the stages computed before the options existed (the same bits).
CUDA outputs are not bitwise equal to CPU outputs, in float32 neither (other kernels, other
summation orders; cuDNN may run float32 convolutions in TF32). A bad value raises a ValueError
naming the params key and what it accepts.
"""
from __future__ import annotations

import torch

from brainldm.train.config import ConfigError
from brainldm.train.distributed import resolve_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = "float32"


def stage_dtype(section: str, dtype: str, device: torch.device) -> torch.dtype:
    """``<section>.dtype`` -> torch.dtype; float16/bfloat16 only with a CUDA ``device``."""
    if dtype not in DTYPES:
        raise ConfigError(f"{section}.dtype: got {dtype!r}, expected one of {list(DTYPES)}")
    if dtype != DEFAULT_DTYPE and device.type != "cuda":
        raise ConfigError(f"{section}.dtype: {dtype!r} needs a CUDA device, got device {device.type!r}; "
                          f"on CPU use {DEFAULT_DTYPE!r}")
    return DTYPES[dtype]


def stage_device_dtype(section: str, device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Both options of a diffusion stage's section, checked together (the dtype depends on the device)."""
    resolved = resolve_device(device, f"{section}.device")
    return resolved, stage_dtype(section, dtype, resolved)
