"""Stage-1 decoders: fMRI voxels -> flattened target (``z`` latent or ``c`` text states).

Every decoder maps ``x (B, V) float32`` (the z-scored voxels of its input ROIs,
concatenated in the configured ROI order) to ``(B, K) float32`` (the flattened,
per-dimension standardised target; K = C*h*w for ``z``, T*D for ``c``). Forward
passes have no data-dependent Python control flow, so they trace and export to
ONNX (``dynamo=False``, opset 18) with a dynamic batch axis.

Checkpoints (one safetensors file per decoder) hold the weights, the target
statistics and, in the metadata, everything needed to rebuild the module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from brainldm.runtime.atomic import atomic_path

CHECKPOINT_FORMAT_VERSION = "1"
METADATA_KEY = "brainldm_decoder"  # safetensors metadata key holding the JSON header
LOGVAR_CLAMP = 10.0  # keeps exp(logvar) finite early in VAE training
VAE_NEGATIVE_SLOPE = 0.2
GCN_POOLINGS = ("mean", "flatten")


class ResidualBlock1d(nn.Module):
    """Conv1d-BN-ReLU-Conv1d-BN plus identity skip, then ReLU; ``(B, C, L) -> (B, C, L)``.

    The original course code reused one set of conv weights for all its "residual"
    blocks and never added the input back; this block has its own weights and a real
    skip connection, as the report describes (after Lin et al., 2022).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv1d(channels, channels, kernel_size, padding=pad, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size, padding=pad, bias=False),
            nn.BatchNorm1d(channels),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class CnnDecoder(nn.Module):
    """CNN->c / CNN->z: voxels as a 1-channel sequence, residual Conv1d, pooling, 3 FC.

    ``x (B, V) -> (B, out_dim)``. The stem conv (stride ``stem_stride``) shortens the
    sequence, ``n_blocks`` residual blocks keep its length, average pooling (window
    ``pool``) shortens it again, and FC layers ``hidden[0]``, ``hidden[1]``,
    ``out_dim`` map the flattened features to the target.
    """

    def __init__(self, n_voxels: int, out_dim: int, channels: int = 16, n_blocks: int = 2,
                 kernel_size: int = 7, stem_stride: int = 4, pool: int = 4,
                 hidden: tuple[int, int] = (512, 512), dropout: float = 0.1):
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(f"CnnDecoder: hidden must hold 2 sizes (3 FC layers), got {hidden}")
        pad = kernel_size // 2
        length = (n_voxels + 2 * pad - kernel_size) // stem_stride + 1
        pooled = length // pool
        if pooled < 1:
            raise ValueError(f"CnnDecoder: {n_voxels} voxels are too few for stem_stride={stem_stride}, pool={pool}")
        self.stem = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size, stride=stem_stride, padding=pad, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*[ResidualBlock1d(channels, kernel_size) for _ in range(n_blocks)])
        self.pool = nn.AvgPool1d(pool, stride=pool)
        self.head = nn.Sequential(
            nn.Linear(channels * pooled, hidden[0]), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden[1], out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.blocks(self.stem(x.unsqueeze(1))))
        return self.head(h.flatten(1))


class VaeDecoder(nn.Module):
    """VAE->z: FC encoder to a Gaussian latent that *is* the predicted (flattened) z.

    ``forward(x (B, V)) -> mu (B, latent_dim)``: the posterior mean, the prediction
    used at evaluation and export. ``training_terms`` draws the reparameterised
    sample and reconstructs the fMRI from it with 3 FC-BN-LeakyReLU blocks and a
    linear read-out (z-scored voxels are signed, so the read-out has no activation).
    """

    def __init__(self, n_voxels: int, latent_dim: int, hidden: int = 512, recon_hidden: int = 512,
                 dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_voxels, hidden), nn.LeakyReLU(VAE_NEGATIVE_SLOPE),
                                     nn.Dropout(dropout))
        self.to_stats = nn.Linear(hidden, 2 * latent_dim)
        sizes = (latent_dim, recon_hidden, recon_hidden, recon_hidden)
        blocks = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.LeakyReLU(VAE_NEGATIVE_SLOPE)]
        self.decoder = nn.Sequential(*blocks, nn.Linear(recon_hidden, n_voxels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, V) -> (mu, logvar)``, each ``(B, latent_dim)``; logvar clamped to +-10."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    def training_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(latent, mu, logvar, recon)``: latent = mu + eps*sigma in training mode, mu in eval."""
        mu, logvar = self.encode(x)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return latent, mu, logvar, self.decoder(latent)


def vae_loss(model: VaeDecoder, x: torch.Tensor, target: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """MSE(latent, target) + beta * KL(q(latent|x) || N(0, I)) + gamma * MSE(recon, x); scalar.

    ``x (B, V)``, ``target (B, K)`` standardised. KL is averaged over batch and latent
    dimensions, like the MSE terms, so beta and gamma are scale-free.
    """
    latent, mu, logvar, recon = model.training_terms(x)
    kl = -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())
    return nn.functional.mse_loss(latent, target) + beta * kl + gamma * nn.functional.mse_loss(recon, x)


class GcnDecoder(nn.Module):
    """GCN->z: two ChebConv layers (BatchNorm, ReLU) over a fixed ROI graph, node pooling, FC head.

    ``x (B, V) -> (B, out_dim)``. Node features are gathered from ``x`` with the
    buffer ``node_index (N, P)`` (entries ``V`` select a zero: right padding to the
    common length P). The graph (``edge_index (2, E)``, ``edge_weight (E,)``) is a
    buffer fixed per model; features are ``(B, N, F)`` and PyG propagates along the
    node axis, so batching needs no edge offsets. ``pooling``: ``mean`` over nodes
    (``(B, hidden)``) or ``flatten`` (``(B, N*hidden)``).
    """

    def __init__(self, node_index: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor,
                 out_dim: int, hidden: int = 64, cheb_k: int = 2, pooling: str = "mean",
                 head_hidden: int = 256, dropout: float = 0.1):
        # Imported here: torch_geometric takes 2-3 s to import, which every fit, decode, export
        # and parity process of the other decoders would otherwise pay for nothing.
        from torch_geometric.nn import ChebConv

        super().__init__()
        if pooling not in GCN_POOLINGS:
            raise ValueError(f"GcnDecoder: pooling must be one of {GCN_POOLINGS}, got {pooling!r}")
        n_nodes, pad_length = node_index.shape
        _check_degrees(edge_index, edge_weight, n_nodes)
        self.register_buffer("node_index", node_index.long())
        self.register_buffer("edge_index", edge_index.long())
        self.register_buffer("edge_weight", edge_weight.float())
        self.conv1 = ChebConv(pad_length, hidden, K=cheb_k)
        self.conv2 = ChebConv(hidden, hidden, K=cheb_k)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.flatten_nodes = pooling == "flatten"
        pooled = n_nodes * hidden if self.flatten_nodes else hidden
        self.head = nn.Sequential(nn.Linear(pooled, head_hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(head_hidden, out_dim))

    def _conv_bn(self, conv: nn.Module, bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        h = conv(h, self.edge_index, self.edge_weight)
        return self.act(bn(h.transpose(1, 2)).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. node features (B, N, P): the padding column is a zero appended to x
        h = nn.functional.pad(x, (0, 1))[:, self.node_index]
        # 2. two graph convolutions over the node axis
        h = self._conv_bn(self.conv2, self.bn2, self._conv_bn(self.conv1, self.bn1, h))
        # 3. pool over nodes, FC head
        pooled = h.flatten(1) if self.flatten_nodes else h.mean(dim=1)
        return self.head(pooled)


def _check_degrees(edge_index: torch.Tensor, edge_weight: torch.Tensor, n_nodes: int) -> None:
    """ChebConv's symmetric normalisation needs non-negative weighted degrees (D^-1/2)."""
    if edge_index.shape[0] != 2 or edge_index.shape[1] != edge_weight.shape[0]:
        raise ValueError(f"graph: edge_index must be (2, E) and edge_weight (E,), got "
                         f"{tuple(edge_index.shape)} and {tuple(edge_weight.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= n_nodes):
        raise ValueError(f"graph: edge_index must index nodes 0..{n_nodes - 1}")
    off_diag = edge_index[0] != edge_index[1]
    degree = torch.zeros(n_nodes).index_add_(0, edge_index[0][off_diag], edge_weight.float()[off_diag])
    if bool((degree < 0).any()):
        raise ValueError(f"graph: negative weighted node degree {degree.tolist()} (edge weights are "
                         "Pearson r; ChebConv's D^-1/2 normalisation needs degrees >= 0)")


class LinearDecoder(nn.Module):
    """Ridge baseline as a module: ``x (B, V) -> x @ W + b``, ``W (V, K)``, ``b (K,)``."""

    def __init__(self, n_voxels: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(n_voxels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Destandardise(nn.Module):
    """Wraps a decoder: ``x (B, V) -> pred (B, *target_shape)`` in the original target scale."""

    def __init__(self, decoder: nn.Module, mean: torch.Tensor, std: torch.Tensor, target_shape: tuple[int, ...]):
        super().__init__()
        self.decoder = decoder
        self.register_buffer("mean", mean.float().reshape(-1))
        self.register_buffer("std", std.float().reshape(-1))
        self.target_shape = tuple(int(s) for s in target_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.decoder(x) * self.std + self.mean).reshape((-1,) + self.target_shape)


DECODER_KINDS = ("ridge", "cnn", "vae", "gcn")
VAE_LOSS_KEYS = ("beta", "gamma")


@dataclass(frozen=True)
class DecoderSpec:
    """What a checkpoint needs to rebuild its decoder (stored as JSON in the metadata).

    ``arch`` holds the kind's constructor sizes (for ``vae`` also the loss weights
    beta, gamma); ``roi_sizes[i]`` is the voxel count of ``input_rois[i]``; input
    voxels are those ROIs concatenated in that order; ``node_rois`` (gcn only) lists
    the ROIs of each graph node.
    """

    kind: str
    target: str
    target_shape: tuple[int, ...]
    input_rois: tuple[str, ...]
    roi_sizes: tuple[int, ...]
    arch: dict[str, Any]
    node_rois: tuple[tuple[str, ...], ...] | None = None

    @property
    def n_voxels(self) -> int:
        return int(sum(self.roi_sizes))

    @property
    def out_dim(self) -> int:
        return int(torch.tensor(self.target_shape).prod())

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DecoderSpec":
        d = json.loads(text)
        node_rois = tuple(tuple(n) for n in d["node_rois"]) if d.get("node_rois") is not None else None
        return cls(kind=d["kind"], target=d["target"], target_shape=tuple(d["target_shape"]),
                   input_rois=tuple(d["input_rois"]), roi_sizes=tuple(d["roi_sizes"]), arch=dict(d["arch"]),
                   node_rois=node_rois)


def node_index(spec: DecoderSpec) -> torch.Tensor:
    """``(N, P) int64``: for node n, the input-voxel columns of its ROIs (in ``node_rois`` order),
    right-padded with ``V`` (the zero column) to P = the largest node's voxel count."""
    if spec.node_rois is None:
        raise ValueError("gcn decoder needs node_rois (graph/node_rois of the prepared file)")
    starts = dict(zip(spec.input_rois, torch.tensor((0,) + spec.roi_sizes).cumsum(0).tolist()))
    sizes = dict(zip(spec.input_rois, spec.roi_sizes))
    missing = sorted({r for node in spec.node_rois for r in node} - set(spec.input_rois))
    if missing:
        raise ValueError(f"gcn decoder: graph node ROIs {missing} are not in input_rois {list(spec.input_rois)}")
    unused = [r for r in spec.input_rois if all(r not in node for node in spec.node_rois)]
    if unused:
        raise ValueError(f"gcn decoder: input ROI(s) {unused} belong to no graph node {list(spec.node_rois)}")
    columns = [torch.cat([torch.arange(starts[r], starts[r] + sizes[r]) for r in node]) for node in spec.node_rois]
    pad_length = max(len(c) for c in columns)
    index = torch.full((len(columns), pad_length), spec.n_voxels, dtype=torch.long)
    for n, cols in enumerate(columns):
        index[n, : len(cols)] = cols
    return index


def build_decoder(spec: DecoderSpec, edge_index: torch.Tensor | None = None,
                  edge_weight: torch.Tensor | None = None) -> nn.Module:
    """A freshly initialised decoder ``(B, V) -> (B, K)`` for ``spec`` (gcn also needs the graph)."""
    arch = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.arch.items()}
    if spec.kind == "ridge":
        return LinearDecoder(spec.n_voxels, spec.out_dim)
    if spec.kind == "cnn":
        return CnnDecoder(spec.n_voxels, spec.out_dim, **arch)
    if spec.kind == "vae":
        return VaeDecoder(spec.n_voxels, spec.out_dim, **{k: v for k, v in arch.items() if k not in VAE_LOSS_KEYS})
    if spec.kind == "gcn":
        if edge_index is None or edge_weight is None:
            raise ValueError("gcn decoder needs the ROI graph (edge_index, edge_weight)")
        return GcnDecoder(node_index(spec), edge_index, edge_weight, spec.out_dim, **arch)
    raise ValueError(f"unknown decoder kind {spec.kind!r}; expected one of {DECODER_KINDS}")


@dataclass
class Checkpoint:
    """A loaded decoder (eval mode) with its spec, target statistics and resolved fit config."""

    spec: DecoderSpec
    decoder: nn.Module
    target_mean: torch.Tensor
    target_std: torch.Tensor
    config: dict[str, Any]

    def predictor(self) -> Destandardise:
        """``x (B, V) -> (B, *target_shape)`` in target units (what decode and export use)."""
        return Destandardise(self.decoder, self.target_mean, self.target_std, self.spec.target_shape).eval()


def save_checkpoint(path: str | Path, spec: DecoderSpec, decoder: nn.Module, target_mean: torch.Tensor,
                    target_std: torch.Tensor, config_json: str) -> None:
    """Write ``decoder.*`` weights/buffers, ``target_mean``/``target_std (K,)`` and, under metadata key
    ``brainldm_decoder``, JSON {format_version, spec, config} to a safetensors file, atomically."""
    tensors = {f"decoder.{k}": v.detach().cpu().contiguous().clone() for k, v in decoder.state_dict().items()}
    tensors["target_mean"] = target_mean.detach().float().contiguous()
    tensors["target_std"] = target_std.detach().float().contiguous()
    # one metadata key: safetensors writes several keys in hash order, which would make the bytes vary
    header = {"format_version": CHECKPOINT_FORMAT_VERSION, "spec": json.loads(spec.to_json()),
              "config": json.loads(config_json)}
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; the decoder is returned in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder checkpoint not found: {path} (run the fit stage first)")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    if header.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path}: not a brainldm decoder checkpoint (metadata {METADATA_KEY!r} format_version "
                         f"{header.get('format_version')!r}, expected {CHECKPOINT_FORMAT_VERSION!r})")
    tensors = load_file(str(path))
    spec = DecoderSpec.from_json(json.dumps(header["spec"]))
    state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    decoder = build_decoder(spec, state.get("edge_index"), state.get("edge_weight"))
    decoder.load_state_dict(state)
    return Checkpoint(spec, decoder.eval(), tensors["target_mean"], tensors["target_std"], header["config"])
