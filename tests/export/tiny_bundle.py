"""Tiny seeded inputs of the export stage: prepared file, two decoders, targets, tiny SD pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from brainldm.export import export as ex
from brainldm.train.decoding import decoders
from brainldm.train.reconstruction.reconstruct import PairConfig, ReconstructConfig
from tests.tiny_models import LATENT_CHANNELS, TEXT_WIDTH, save_tiny_pipeline

DATASET, PAIR = "ds", "ours"
ROIS = {"A": [0, 3, 6, 9, 12, 15, 18, 21, 24, 27], "B": list(range(1, 30, 3)), "C": list(range(2, 30, 3))}
N_VOXELS, SESSIONS, T = 30, (1, 3), 5
TEST_IMAGES = (2, 5, 9, 11)  # image rows of the test split (sorted, as prepare writes them)
REPEATS = 2
Z_SHAPE, C_SHAPE = (LATENT_CHANNELS, 4, 4), (T, TEXT_WIDTH)


def raw_test(seed: int = 0) -> dict[str, np.ndarray]:
    """Raw test trials: REPEATS per image in shuffled order, sessions from SESSIONS."""
    rng = np.random.default_rng(seed)
    image_index = rng.permutation(np.repeat(TEST_IMAGES, REPEATS)).astype(np.int64)
    session = rng.choice(SESSIONS, len(image_index)).astype(np.int64)
    betas = (rng.standard_normal((len(image_index), N_VOXELS)) * 2 + 5).astype(np.float32)
    return {"betas": betas, "session": session, "image_index": image_index}


def write_prepared(path: Path, seed: int = 0) -> dict:
    """A prepared file with the fields export and parity read (test split made by prepare's arithmetic)."""
    rng = np.random.default_rng(seed + 1)
    mean = (rng.standard_normal((len(SESSIONS), N_VOXELS)) + 5).astype(np.float32)
    std = rng.uniform(1.5, 2.5, (len(SESSIONS), N_VOXELS)).astype(np.float32)
    raw = raw_test(seed)
    rows = np.searchsorted(SESSIONS, raw["session"])
    z = ((raw["betas"] - mean[rows]) / std[rows]).astype(np.float32)
    test = np.stack([z[raw["image_index"] == i].astype(np.float64).mean(axis=0) for i in TEST_IMAGES]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(dataset=DATASET, subject="subj01", source="nsd", format_version=1)
        for roi, cols in ROIS.items():
            f[f"rois/{roi}/columns"] = np.array(cols, np.int64)
            f[f"splits/test/rois/{roi}"] = test[:, cols]
        f["splits/test/image_index"] = np.array(TEST_IMAGES, np.int64)
        f["norm/sessions"], f["norm/mean"], f["norm/std"] = np.array(SESSIONS, np.int64), mean, std
        f["norm/voxel_ids"] = np.arange(100, 100 + N_VOXELS, dtype=np.int64)
        for key, value in raw.items():
            f[f"raw_test/{key}"] = value
        f["graph/edge_index"] = np.array([[0, 1, 1, 2], [1, 0, 2, 1]], np.int64)
        f["graph/edge_weight"] = np.array([0.5, 0.5, 0.3, 0.3], np.float32)
        f["graph/node_rois"] = json.dumps([["A"], ["B"], ["C"]])
        f["graph"].attrs["pad_length"] = 10
    return raw


def write_decoders(folder: Path, seed: int = 0, z_shape: tuple = Z_SHAPE, c_shape: tuple = C_SHAPE) -> None:
    """gcn-z (A, B, C -> z) and cnn-c (B, C -> c) with seeded random weights."""
    torch.manual_seed(seed)
    gcn = decoders.DecoderSpec("gcn", "z", z_shape, ("A", "B", "C"), (10, 10, 10),
                               {"hidden": 8, "cheb_k": 2, "pooling": "flatten", "head_hidden": 16},
                               node_rois=(("A",), ("B",), ("C",)))
    cnn = decoders.DecoderSpec("cnn", "c", c_shape, ("B", "C"), (10, 10),
                               {"channels": 4, "n_blocks": 1, "kernel_size": 3, "stem_stride": 1, "pool": 2,
                                "hidden": [16, 16]})
    graph = (torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), torch.tensor([0.5, 0.5, 0.3, 0.3]))
    for name, spec in (("gcn-z", gcn), ("cnn-c", cnn)):
        module = decoders.build_decoder(spec, *graph).eval()
        mean = torch.randn(spec.out_dim) * 0.1
        std = torch.rand(spec.out_dim) * 0.5 + 0.5
        decoders.save_checkpoint(folder / DATASET / f"{name}.safetensors", spec, module, mean, std, "{}")


def write_targets(folder: Path, seed: int = 0, c_shape: tuple = C_SHAPE) -> None:
    rng = np.random.default_rng(seed + 2)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{DATASET}.h5", "w") as f:
        f["uncond"] = rng.standard_normal(c_shape).astype(np.float32)


def make_configs(root: Path, model: Path | None = None, **export_overrides) -> tuple[ex.ExportConfig, ReconstructConfig]:
    """Write every input under ``root`` (once) and return the export and reconstruct configs.

    model: an SD-v1 diffusers folder (default: a tiny random one written to ``root/ldm``);
    the seeded decoders are shaped to its latents (C, h, w) and text states (77, D)
    (to Z_SHAPE, C_SHAPE for the tiny one).
    """
    z_shape, c_shape = (Z_SHAPE, C_SHAPE) if model is None else model_target_shapes(model)
    if model is None:
        model = root / "ldm"
        if not model.is_dir():
            save_tiny_pipeline(model)
    if not (root / "prepared").is_dir():
        write_prepared(root / "prepared" / f"{DATASET}.h5")
        write_decoders(root / "decoders", z_shape=z_shape, c_shape=c_shape)
        write_targets(root / "targets", c_shape=c_shape)
    ecfg = ex.ExportConfig(prepared_dir=str(root / "prepared"), targets_dir=str(root / "targets"),
                           models_dir=str(root / "decoders"), out_dir=str(root / "bundles"),
                           checks_dir=str(root / "checks"), **export_overrides)
    rc = ReconstructConfig(model=str(model), pairs={PAIR: PairConfig(z="gcn-z", c="cnn-c")}, samples=2, steps=10,
                           strength=0.8, guidance=5.0, seed=42, batch_size=4,
                           decode_dir=str(root / "decode"), targets_dir=str(root / "targets"))
    return ecfg, rc


def model_target_shapes(model: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """z (C, h, w) and c (77, D) shapes of a diffusers folder, from its configs."""
    vae = json.loads((model / "vae" / "config.json").read_text())
    text = json.loads((model / "text_encoder" / "config.json").read_text())
    side = vae["sample_size"] // 2 ** (len(vae["block_out_channels"]) - 1)
    return (vae["latent_channels"], side, side), (text["max_position_embeddings"], text["hidden_size"])


def build_tiny_bundle(root: Path) -> Path:
    """Export the tiny pair to ``root/bundles/ds-ours`` and return it."""
    ecfg, rc = make_configs(root)
    return ex.run(ecfg, rc, DATASET, PAIR)
