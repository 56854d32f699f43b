"""The ROI graph of the GCN decoder: nodes are groups of ROIs, edges functional connectivity.

A node is a list of ROI names (default V1 | V2 | V3+hV4). Its features for one sample
are the concatenated normalised voxels of its ROIs, zero-padded at the end to the
longest node, so every node has ``pad_length`` features. Edges come from the Pearson
correlation of node-mean responses over *training* trials only (never validation or
test), thresholded; the sign handling and self-loops are parameters.

Used by ``prepare`` (to build and store the graph) and later by ``fit`` / ``export``
(``node_features`` turns per-ROI matrices into the GCN input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_NODES = (("V1",), ("V2",), ("V3", "hV4"))
WEIGHT_MODES = ("abs", "signed", "positive")


@dataclass(frozen=True)
class GraphConfig:
    """ROI-graph parameters.

    nodes: one list of ROI names per node.
    threshold: keep an edge when its score is >= threshold (score = |r| for
        ``abs`` / ``signed``, r for ``positive``).
    weight_mode: ``abs`` weight |r|; ``signed`` weight r; ``positive`` weight r,
        negative correlations dropped.
    self_loops: add (i, i) edges with weight 1 (a node's correlation with itself).
    """

    nodes: tuple[tuple[str, ...], ...] = DEFAULT_NODES
    threshold: float = 0.0
    weight_mode: str = "abs"
    self_loops: bool = False


@dataclass(frozen=True)
class RoiGraph:
    """edge_index (2, E) int64 (source, target); edge_weight (E,) float32;
    node_rois: ROI names per node; pad_length: features per node."""

    edge_index: np.ndarray
    edge_weight: np.ndarray
    node_rois: tuple[tuple[str, ...], ...]
    pad_length: int


def validate_nodes(nodes: Sequence[Sequence[str]], roi_names: Sequence[str]) -> None:
    """Raise ValueError unless every node is a non-empty list of known ROI names."""
    if not nodes:
        raise ValueError("graph.nodes: expected at least one node (a list of ROI names)")
    known = set(roi_names)
    for i, node in enumerate(nodes):
        if not node:
            raise ValueError(f"graph.nodes[{i}]: empty node; expected a list of ROI names")
        missing = [r for r in node if r not in known]
        if missing:
            raise ValueError(f"graph.nodes[{i}]: unknown ROI(s) {missing}; prepared ROIs are {sorted(known)}")


def node_lengths(roi_sizes: Mapping[str, int], nodes: Sequence[Sequence[str]]) -> list[int]:
    """Number of voxels of each node (sum over its ROIs)."""
    return [int(sum(roi_sizes[r] for r in node)) for node in nodes]


def pad_length_of(roi_sizes: Mapping[str, int], nodes: Sequence[Sequence[str]]) -> int:
    """Node feature length: the largest node's voxel count."""
    return max(node_lengths(roi_sizes, nodes))


def node_features(
    rois: Mapping[str, np.ndarray], nodes: Sequence[Sequence[str]], pad_length: int | None = None
) -> np.ndarray:
    """GCN input from per-ROI matrices.

    Args:
        rois: ROI name -> (n, V_roi) float responses (all with the same n).
        nodes: ROI names per node.
        pad_length: feature length (default: the longest node); must be >= every node.
    Returns:
        (n, n_nodes, pad_length) float32: node k holds its ROIs' voxels concatenated
        in the order given, zeros after.
    """
    validate_nodes(nodes, list(rois))
    sizes = {name: int(np.shape(m)[1]) for name, m in rois.items()}
    lengths = node_lengths(sizes, nodes)
    pad = max(lengths) if pad_length is None else int(pad_length)
    if pad < max(lengths):
        raise ValueError(f"pad_length {pad} is shorter than the longest node ({max(lengths)} voxels)")
    n = {int(np.shape(rois[r])[0]) for node in nodes for r in node}
    if len(n) != 1:
        raise ValueError(f"ROI matrices disagree on the number of samples: {sorted(n)}")
    out = np.zeros((n.pop(), len(nodes), pad), dtype=np.float32)
    for k, node in enumerate(nodes):
        out[:, k, : lengths[k]] = np.concatenate([np.asarray(rois[r], dtype=np.float32) for r in node], axis=1)
    return out


def node_means(rois: Mapping[str, np.ndarray], nodes: Sequence[Sequence[str]]) -> np.ndarray:
    """(n, n_nodes) float64: mean over each node's voxels (padding excluded)."""
    validate_nodes(nodes, list(rois))
    cols = []
    for node in nodes:
        stacked = np.concatenate([np.asarray(rois[r], dtype=np.float64) for r in node], axis=1)
        cols.append(stacked.mean(axis=1))
    return np.stack(cols, axis=1)


def pearson_matrix(x: np.ndarray) -> np.ndarray:
    """(k, k) Pearson r between the columns of x (n, k); 0 where a column is constant."""
    centred = x - x.mean(axis=0, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=0))
    safe = np.where(norms > 0, norms, 1.0)
    r = (centred.T @ centred) / np.outer(safe, safe)
    r[norms == 0, :] = 0.0
    r[:, norms == 0] = 0.0
    np.fill_diagonal(r, 1.0)
    return np.clip(r, -1.0, 1.0)


def edges_from_correlation(r: np.ndarray, config: GraphConfig) -> tuple[np.ndarray, np.ndarray]:
    """Edges (both directions) of a (k, k) correlation matrix under ``config``.

    Returns edge_index (2, E) int64 ordered by (source, target), edge_weight (E,) float32.
    """
    if config.weight_mode not in WEIGHT_MODES:
        raise ValueError(f"graph.weight_mode: {config.weight_mode!r}; expected one of {list(WEIGHT_MODES)}")
    edges: list[tuple[int, int, float]] = []
    for i in range(r.shape[0]):
        for j in range(r.shape[0]):
            if i == j:
                if config.self_loops:
                    edges.append((i, j, 1.0))
                continue
            score = r[i, j] if config.weight_mode == "positive" else abs(r[i, j])
            if score >= config.threshold:
                edges.append((i, j, abs(r[i, j]) if config.weight_mode == "abs" else r[i, j]))
    edge_index = np.array([[e[0] for e in edges], [e[1] for e in edges]], dtype=np.int64).reshape(2, -1)
    return edge_index, np.array([e[2] for e in edges], dtype=np.float32)


def build_graph(train_rois: Mapping[str, np.ndarray], config: GraphConfig) -> RoiGraph:
    """Build the ROI graph from TRAINING responses only.

    Args:
        train_rois: ROI name -> (n_train, V_roi) z-scored training trials.
        config: nodes, threshold, weight mode, self-loops.
    """
    nodes = tuple(tuple(node) for node in config.nodes)
    r = pearson_matrix(node_means(train_rois, nodes))
    edge_index, edge_weight = edges_from_correlation(r, config)
    sizes = {name: int(m.shape[1]) for name, m in train_rois.items()}
    return RoiGraph(edge_index, edge_weight, nodes, pad_length_of(sizes, nodes))
