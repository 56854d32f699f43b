"""Stage `attribute_classifier`: a small CNN that reads scene attributes from an image.

It gives the evaluation two things that need no downloaded weights: a feature space
for two-way identification (its penultimate layer) and per-attribute predictions
(main object kind and colour, object count, background) to check whether a
reconstruction shows the same scene as its stimulus. It is trained on procedural
scenes drawn with its own seed, never on any subject's test stimuli.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.train.simulation import scenes
from brainldm.train.config import ConfigError, config_to_dict, from_dict, load_config, run_stage

ATTRIBUTES = ("kind", "colour", "count", "background")
# scenes.attributes() counts objects from 1; the count head predicts count - 1.
LABEL_OFFSET = {"kind": 0, "colour": 0, "count": 1, "background": 0}
VAL_SEED_OFFSET = 1  # the held-out scenes use seed + 1: disjoint from the training draw
FORMAT = "brainldm-attribute-classifier-1"
METADATA_KEY = "brainldm_attribute_classifier"


@dataclass(frozen=True)
class AttributeClassifierConfig:
    """Params section `attribute_classifier`."""

    seed: int = 20240601  # own seed: never the simulated subject's stimulus seed
    image_size: int = 64  # px; the dataset image size
    max_objects: int = 3
    n_train: int = 3000
    n_val: int = 800
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (16, 32, 32)
    pooled_size: int = 4  # spatial size kept before the dense layer (counts need position)
    feature_dim: int = 128
    threads: int = 2
    out: str = "models/attribute_classifier.safetensors"
    metrics: str = "results/attribute_classifier/metrics.json"


def class_counts(max_objects: int) -> dict[str, int]:
    """Number of classes of each attribute head."""
    return {"kind": len(scenes.SHAPE_KINDS), "colour": len(scenes.COLOURS), "count": max_objects,
            "background": len(scenes.BACKGROUNDS)}


class AttributeNet(nn.Module):
    """Conv blocks (conv, batch norm, ReLU, 2x max-pool) -> pooled map -> dense feature layer.

    One linear head per attribute reads the dense features (the penultimate layer).
    """

    def __init__(self, channels: tuple[int, ...], pooled_size: int, feature_dim: int, n_classes: dict[str, int]):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pooled_size)
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(previous * pooled_size ** 2, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in n_classes.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S) float32 in [-1, 1] -> penultimate features (B, feature_dim)."""
        return self.dense(self.pool(self.conv(x)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.embed(x)
        return {name: head(feats) for name, head in self.heads.items()}


def _build(cfg: AttributeClassifierConfig) -> AttributeNet:
    model = AttributeNet(cfg.channels, cfg.pooled_size, cfg.feature_dim, class_counts(cfg.max_objects))
    model.config = cfg  # the input size and architecture travel with the model
    return model


def to_input(images: np.ndarray, size: int) -> torch.Tensor:
    """images (N, H, W, 3) uint8 -> (N, 3, size, size) float32 in [-1, 1] (antialiased bilinear resize)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected images (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _labels(attrs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(attrs[k] - LABEL_OFFSET[k]) for k in ATTRIBUTES}


def _train_epochs(model: AttributeNet, x: torch.Tensor, y: dict[str, torch.Tensor], cfg: AttributeClassifierConfig) -> list[float]:
    generator = torch.Generator().manual_seed(cfg.seed)
    # fused: the same bits on every processor compared (see fit.train_network)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    steps = cfg.epochs * -(-len(x) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.learning_rate, total_steps=steps)
    losses = []
    model.train()
    for _ in tqdm(range(cfg.epochs), desc="attribute classifier", unit="epoch"):
        order, total = torch.randperm(len(x), generator=generator), 0.0
        for start in range(0, len(x), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            logits = model(x[batch])
            loss = sum(nn.functional.cross_entropy(logits[k], y[k][batch]) for k in ATTRIBUTES)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(x))
    model.eval()
    return losses


def train(cfg: AttributeClassifierConfig) -> tuple[AttributeNet, dict]:
    """Train on ``cfg.n_train`` scenes (seed ``cfg.seed``); evaluate on ``cfg.n_val`` scenes (seed + 1).

    Returns the model (eval mode) and metrics: held-out accuracy per attribute, chance
    (majority-class rate of the held-out labels), training loss per epoch.
    """
    if cfg.n_train < 1 or cfg.n_val < 1 or cfg.epochs < 1 or not 1 <= cfg.max_objects <= 3:
        raise ConfigError(f"attribute_classifier: need n_train, n_val, epochs >= 1 and 1 <= max_objects <= 3; got {cfg}")
    torch.manual_seed(cfg.seed)
    with _threads(cfg.threads):
        # 1. Scenes: the training draw and a disjoint held-out draw.
        train_images, _, train_attrs, _ = scenes.generate(cfg.n_train, cfg.seed, cfg.image_size, 1, cfg.max_objects)
        val_images, _, val_attrs, _ = scenes.generate(cfg.n_val, cfg.seed + VAL_SEED_OFFSET, cfg.image_size, 1, cfg.max_objects)
        # 2. Fit all heads jointly.
        model = _build(cfg)
        losses = _train_epochs(model, to_input(train_images, cfg.image_size), _labels(train_attrs), cfg)
        # 3. Held-out accuracy per attribute.
        pred = predict_attributes(model, val_images)
    accuracy = {k: float(np.mean(pred[k] == val_attrs[k])) for k in ATTRIBUTES}
    chance = {k: float(np.bincount(val_attrs[k]).max() / cfg.n_val) for k in ATTRIBUTES}
    return model, {"val_accuracy": accuracy, "val_chance": chance, "train_loss": losses, "n_train": cfg.n_train,
                   "n_val": cfg.n_val, "config": config_to_dict(cfg)}


class _threads:
    """Temporarily fix torch's intra-op thread count (0 = leave it) and use deterministic
    algorithms, so that the checkpoint is bitwise the same on every run."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()
        self.was_deterministic = torch.are_deterministic_algorithms_enabled()

    def __enter__(self):
        if self.n > 0:
            torch.set_num_threads(self.n)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
        torch.use_deterministic_algorithms(self.was_deterministic)


def save_classifier(model: AttributeNet, cfg: AttributeClassifierConfig, path: str | Path) -> None:
    """Write the weights as safetensors with JSON {format, config} under one metadata key, atomically."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # one metadata key: safetensors writes several keys in per-process hash order, so the bytes would vary
    header = json.dumps({"format": FORMAT, "config": config_to_dict(cfg)}, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: header})


def load_classifier(path: str | Path) -> AttributeNet:
    """Load a classifier saved by :func:`save_classifier` (eval mode, CPU); ``model.config`` holds its config."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute classifier not found: {path}; run the attribute_classifier stage first")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    if header.get("format") != FORMAT or "config" not in header:
        raise ValueError(f"{path}: not an attribute classifier (metadata format {header.get('format')!r}, expected {FORMAT!r})")
    cfg = from_dict(AttributeClassifierConfig, header["config"], where=f"{path} config")
    model = _build(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def _run(model: AttributeNet, images: np.ndarray, fn, batch_size: int) -> list:
    outputs = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], model.config.image_size)
        outputs.append(fn(x))
    return outputs


def features(model: AttributeNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features: images (N, H, W, 3) uint8 (resized to the model's size) -> (N, F) float32."""
    out = _run(model, images, model.embed, batch_size)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.dense[1].out_features), np.float32)


def predict_attributes(model: AttributeNet, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted labels (same coding as ``scenes.attributes``): name -> (N,) int64."""
    out = _run(model, images, model, batch_size)
    return {k: (torch.cat([o[k] for o in out]).argmax(1).numpy() if out else np.zeros(0, np.int64)).astype(np.int64)
            + LABEL_OFFSET[k] for k in ATTRIBUTES}


def run(cfg: AttributeClassifierConfig) -> dict:
    """Train, save the model and the metrics JSON; returns the metrics."""
    model, metrics = train(cfg)
    save_classifier(model, cfg, cfg.out)
    write_text_atomic(cfg.metrics, json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_config(AttributeClassifierConfig, "attribute_classifier", args.params)
        metrics = run(cfg)
        return f"wrote {cfg.out}; held-out accuracy {json.dumps(metrics['val_accuracy'])}"
    return run_stage(work)


if __name__ == "__main__":
    sys.exit(main())
