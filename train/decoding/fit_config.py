"""The ``fit`` section of params.yaml: one entry per named decoder, each validated by ``decoder_config``.

Frozen dataclasses loaded by ``config.load_config`` (unknown keys are errors); split from fit.py,
which imports them, so that the training module stays readable.
"""
from __future__ import annotations

from dataclasses import dataclass

from brainldm.train.config import ConfigError, execution_option
from brainldm.train.decoding.decoders import DECODER_KINDS

DEFAULT_ALPHAS = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5)


@dataclass(frozen=True)
class CnnArch:
    """CnnDecoder sizes (see decoders.CnnDecoder)."""

    channels: int = 16
    n_blocks: int = 2
    kernel_size: int = 7
    stem_stride: int = 4
    pool: int = 4
    hidden: tuple[int, ...] = (512, 512)
    dropout: float = 0.1


@dataclass(frozen=True)
class VaeArch:
    """VaeDecoder sizes and loss weights: loss = MSE + beta * KL + gamma * fMRI reconstruction."""

    hidden: int = 512
    recon_hidden: int = 512
    dropout: float = 0.1
    beta: float = 1e-3
    gamma: float = 0.1


@dataclass(frozen=True)
class GcnArch:
    """GcnDecoder sizes; pooling over nodes: mean | flatten."""

    hidden: int = 64
    cheb_k: int = 2
    pooling: str = "flatten"
    head_hidden: int = 256
    dropout: float = 0.1


@dataclass(frozen=True)
class RidgeSettings:
    """Ridge baseline: alphas searched by n_folds-fold CV (folds grouped by image), per target."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    n_folds: int = 5
    target_chunk: int = 1000


@dataclass(frozen=True)
class OptimSettings:
    """Adam, minibatches, early stopping on the validation loss (never test)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 40
    patience: int = 5


@dataclass(frozen=True)
class DecoderConfig:
    """One decoder entry: kind (ridge|cnn|vae|gcn), target (z|c), input ROIs (concatenated in this
    order); the sub-section of its own kind (and only that one); the networks' seed and optimiser."""

    kind: str
    target: str
    input_rois: tuple[str, ...]
    seed: int | None = None  # networks only: ridge is deterministic and not iterative
    optim: OptimSettings | None = None
    cnn: CnnArch | None = None
    vae: VaeArch | None = None
    gcn: GcnArch | None = None
    ridge: RidgeSettings | None = None


@dataclass(frozen=True)
class FitConfig:
    """``fit`` params: folders, CPU threads, target-std floor, device, and the named decoders."""

    decoders: dict[str, DecoderConfig]
    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"
    models_dir: str = "models/decoders"
    results_dir: str = "results/fit"
    threads: int = 1
    std_floor: float = 1e-6
    device: str = execution_option("cpu")  # cpu | cuda | auto (train/distributed.py: resolve_device)


def decoder_config(config: FitConfig, name: str) -> DecoderConfig:
    """The validated entry ``name`` (clear ConfigError for unknown names, kinds, targets, stray sections)."""
    if name not in config.decoders:
        raise ConfigError(f"fit.decoders: unknown decoder {name!r}; configured: {sorted(config.decoders)}")
    entry = config.decoders[name]
    if entry.kind not in DECODER_KINDS:
        raise ConfigError(f"fit.decoders.{name}.kind: {entry.kind!r}; expected one of {DECODER_KINDS}")
    if entry.target not in ("z", "c"):
        raise ConfigError(f"fit.decoders.{name}.target: {entry.target!r}; expected 'z' or 'c'")
    network_keys = ("seed", "optim")
    own = (entry.kind, *network_keys) if entry.kind != "ridge" else (entry.kind,)
    stray = [k for k in (*DECODER_KINDS, *network_keys) if k not in own and getattr(entry, k) is not None]
    if stray:
        raise ConfigError(f"fit.decoders.{name}: section(s) {stray} do not apply to kind {entry.kind!r}")
    missing = [k for k in own if getattr(entry, k) is None]
    if missing:
        raise ConfigError(f"fit.decoders.{name}: missing {missing} (needed by kind {entry.kind!r})")
    if not entry.input_rois:
        raise ConfigError(f"fit.decoders.{name}.input_rois: expected at least one ROI")
    return entry
