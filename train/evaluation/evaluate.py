"""Stage `evaluate`: score every reconstruction pair of a dataset against its stimuli.

Per test image and per sample: PixCorr and SSIM (MindEye protocol, train/evaluation/metrics.py),
then the mean over the samples of that image. Two-way identification is computed per
sample index (the k-th sample of every image against all ground truths) and averaged
over the sample indices, in feature spaces that need no downloaded weights: the image
model's VAE latent space and the attribute classifier's penultimate layer. Attribute
agreement is the fraction of an image's samples whose predicted attributes equal the
classifier's prediction on its stimulus. MindEye's network feature spaces are pluggable
(FEATURE_EXTRACTORS) and read weights only from local paths.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.train.evaluation import attribute_classifier, metrics
from brainldm.train.evaluation.floors import floor_images, paired_difference
from brainldm.train.config import config_to_dict, load_config, run_stage
# The registry lives with the extractors; re-exported here for existing callers.
from brainldm.train.evaluation.feature_extractors import (  # noqa: F401
    FEATURE_EXTRACTORS, MINDEYE_SPACES, FeatureFn, register_extractor,
)

INDEX_COLUMNS = ("test_item", "image_index", "sample", "file")
IDENTIFICATION_CHANCE = 0.5
MAX_LISTED = 20  # offending test items named in an error message


class EvaluateError(ValueError):
    """Reconstructions and ground truth do not fit together."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Params section `evaluate`."""

    pairs: tuple[str, ...] = ("ceiling", "baseline", "ours")
    differences: tuple[tuple[str, str], ...] = (("ours", "baseline"),)  # (a, b): per-image a - b, paired bootstrap
    prepared_dir: str = "data/prepared"
    reconstruct_dir: str = "results/reconstruct"
    out_dir: str = "results/evaluate"
    model: str = "models/ldm"
    classifier: str = "models/attribute_classifier.safetensors"
    feature_weights: dict[str, str | None] = field(default_factory=lambda: {name: None for name in MINDEYE_SPACES})
    device: str = "cpu"  # torch device of the VAE feature space (the SD VAE is slow on CPU)
    batch_size: int = 32
    n_boot: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    grid_items: int = 8
    grid_dpi: int = 150


# ---- inputs ----------------------------------------------------------------------------

@dataclass
class PairImages:
    """One pair's reconstructions: images (n, K, H, W, 3) uint8 aligned with the test split."""

    name: str
    images: np.ndarray
    folder: Path


def load_ground_truth(prepared: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test-split stimuli: images (n, H, W, 3) uint8 and their rows into ``images`` (n,) int64."""
    if not prepared.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {prepared}; run the prepare stage first")
    with h5py.File(prepared, "r") as f:
        if "splits/test/image_index" not in f or "images" not in f:
            raise EvaluateError(f"{prepared}: expected 'images' and 'splits/test/image_index' (docs/prepared_schema.md)")
        index = f["splits/test/image_index"][()].astype(np.int64)
        images = np.stack([f["images"][int(i)] for i in index]) if len(index) else np.zeros((0, 1, 1, 3), np.uint8)
    return images, index


def _read_index(folder: Path) -> list[dict[str, int | str]]:
    path = folder / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"reconstructions not found: {path}; run the reconstruct stage for this pair first")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != INDEX_COLUMNS:
            raise EvaluateError(f"{path}: columns {reader.fieldnames}; expected {list(INDEX_COLUMNS)}")
        return [{k: (row[k] if k == "file" else int(row[k])) for k in INDEX_COLUMNS} for row in reader]


def _expected_samples(folder: Path, rows: list[dict]) -> int:
    config = folder / "config.json"
    if not config.is_file():
        return 1 + max(int(r["sample"]) for r in rows)
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["config"]["samples"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EvaluateError(f"{config}: expected JSON with config.samples (written by reconstruct): {exc!r}") from exc


def load_pair(folder: Path, image_index: np.ndarray) -> PairImages:
    """Read ``index.csv`` and the PNGs of one pair; every test item must have every sample.

    Raises EvaluateError naming missing items, a mismatched image index or mixed image sizes.
    """
    rows = _read_index(folder)
    if not rows:
        raise EvaluateError(f"{folder / 'index.csv'}: no reconstructions listed")
    n, k = len(image_index), _expected_samples(folder, rows)
    found = {(int(r["test_item"]), int(r["sample"])): r for r in rows}
    missing = sorted({i for i in range(n) for s in range(k) if (i, s) not in found})
    if missing:
        raise EvaluateError(f"{folder}: test items {missing[:MAX_LISTED]}{' ...' if len(missing) > MAX_LISTED else ''} lack some of "
                            f"the {k} samples ({len(missing)} of {n} items incomplete); expected items 0..{n - 1}")
    extra = sorted({i for i, s in found if not (0 <= i < n and 0 <= s < k)})
    if extra:
        raise EvaluateError(f"{folder}: test items {extra[:MAX_LISTED]} or their sample numbers lie outside the {n} test items "
                            f"x {k} samples of the prepared test split; the reconstructions belong to another run")
    wrong = sorted({i for (i, s), r in found.items() if r["image_index"] != image_index[i]})
    if wrong:
        raise EvaluateError(f"{folder}: test items {wrong[:MAX_LISTED]} have an image_index that differs from the prepared "
                            "test split; the reconstructions belong to another prepared file")
    images = [[_read_png(folder / str(found[(i, s)]["file"])) for s in range(k)] for i in range(n)]
    shapes = sorted({im.shape for item in images for im in item})
    if len(shapes) != 1:
        raise EvaluateError(f"{folder}: reconstructions have different sizes {shapes}; expected one size per pair")
    return PairImages(folder.name, np.asarray(images, dtype=np.uint8), folder)


def _read_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"reconstruction image not found: {path} (listed in index.csv)")
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"), dtype=np.uint8)


# ---- feature spaces --------------------------------------------------------------------

def vae_features(pipe, images: np.ndarray, batch_size: int, device: str = "cpu") -> np.ndarray:
    """VAE posterior means, flattened: images (N, H, W, 3) uint8 -> (N, C*h*w) float32.

    Images are resized (LANCZOS) to the model's native resolution and mapped to [-1, 1].
    """
    import torch

    from brainldm.train.ldm.image_model import pixels_to_vae
    from brainldm.train.reconstruction.reconstruct import native_resolution

    size = native_resolution(pipe)
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS))
                          for im in images[start:start + batch_size]])
        x = pixels_to_vae(batch).to(device, pipe.vae.dtype)
        with torch.no_grad():
            out.append(pipe.vae.encode(x).latent_dist.mean.flatten(1).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def feature_spaces(cfg: EvaluateConfig, classifier) -> tuple[dict[str, FeatureFn], dict[str, str]]:
    """The feature functions to use and a status line per MindEye space."""
    from brainldm.train.ldm.image_model import load_image_model

    pipe = load_image_model(cfg.model, device=cfg.device)
    spaces: dict[str, FeatureFn] = {
        "vae": lambda ims: vae_features(pipe, ims, cfg.batch_size, cfg.device),
        "classifier": lambda ims: attribute_classifier.features(classifier, ims, cfg.batch_size),
    }
    status = {}
    unknown = sorted(set(cfg.feature_weights) - set(FEATURE_EXTRACTORS))
    if unknown:
        raise EvaluateError(f"evaluate.feature_weights: unknown space(s) {unknown}; known: {sorted(FEATURE_EXTRACTORS)}")
    for name in MINDEYE_SPACES:
        path = cfg.feature_weights.get(name)
        if path is None:
            status[name] = f"not computed: no local weights (set evaluate.feature_weights.{name})"
            continue
        if not Path(path).exists():
            raise FileNotFoundError(f"evaluate.feature_weights.{name}: {path} does not exist")
        spaces[name] = FEATURE_EXTRACTORS[name](path, batch_size=cfg.batch_size)
        status[name] = f"computed from {path}"
    return spaces, status


# ---- scoring ---------------------------------------------------------------------------

def score_pair(gt: np.ndarray, recon: np.ndarray, spaces: dict[str, FeatureFn], classifier) -> dict[str, np.ndarray]:
    """Per-image scores of one pair.

    Args:
        gt: (n, H, W, 3) uint8 stimuli; recon: (n, K, H', W', 3) uint8 reconstructions.
        spaces: feature functions (images -> (N, F)); classifier: the attribute classifier.
    Returns:
        metric name -> (n,) float64, each the mean over the K samples of the image.
    """
    n, k = recon.shape[:2]
    per_sample: dict[str, list[np.ndarray]] = {}

    def add(name: str, values: np.ndarray) -> None:
        per_sample.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    # 1. Ground-truth features and attributes, once.
    gt_feats = {name: fn(gt) for name, fn in spaces.items()}
    gt_attrs = attribute_classifier.predict_attributes(classifier, gt)
    for s in tqdm(range(k), desc="samples", unit="sample", disable=k < 2):
        # 2. Low-level metrics on the s-th sample of every image.
        add("pixcorr", metrics.pixcorr(gt, recon[:, s]))
        add("ssim", metrics.ssim(gt, recon[:, s]))
        # 3. Identification across images at this sample index (distance for EffNet/SwAV).
        for name, fn in spaces.items():
            feats = fn(recon[:, s])
            if MINDEYE_SPACES.get(name, ("identification",))[0] == "distance":
                add(f"{name}_distance", metrics.correlation_distance(gt_feats[name], feats))
            else:
                add(f"ident_{name}", metrics.two_way_identification(gt_feats[name], feats))
        # 4. Attribute agreement with the classifier's reading of the stimulus.
        pred = attribute_classifier.predict_attributes(classifier, recon[:, s])
        for attr in attribute_classifier.ATTRIBUTES:
            add(f"attr_{attr}", pred[attr] == gt_attrs[attr])
    # NaN (PixCorr of a constant image) is left out of that image's mean over samples.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: np.nanmean(np.stack(values), axis=0) for name, values in per_sample.items()}


def attribute_chance(gt_attrs: dict[str, np.ndarray]) -> dict[str, float]:
    """Agreement expected if each reconstruction showed another random test stimulus: sum_c p(c)^2.

    gt_attrs: name -> (n,) int64 classifier predictions on the stimuli.
    """
    return {f"attr_{a}": float(np.sum((np.bincount(v) / len(v)) ** 2)) for a, v in gt_attrs.items()}


def summarise_scores(scores: dict[str, np.ndarray], cfg: EvaluateConfig) -> dict[str, dict]:
    """metric -> mean, sem, CI (over images with a defined score) and n_undefined."""
    out = {}
    for name, values in scores.items():
        finite = values[np.isfinite(values)]
        summary = (dataclasses.asdict(metrics.summarise(finite, cfg.n_boot, cfg.ci_level, cfg.seed))
                   if len(finite) else {"mean": None, "sem": None, "ci_low": None, "ci_high": None, "n": 0})
        out[name] = {**summary, "n_undefined": int(len(values) - len(finite))}
    return out


# ---- the stage -------------------------------------------------------------------------

def protocol(cfg: EvaluateConfig, prepared: Path, gt: np.ndarray, pairs: dict[str, PairImages]) -> dict:
    """The exact evaluation protocol, stated alongside the numbers, which depend on it (docs/data-formats.md)."""
    with h5py.File(prepared, "r") as f:
        session = f["splits/test/session"][()] if "splits/test/session" in f else None
    return {
        "test_images": int(len(gt)),
        "repeats_averaged": None if session is None else bool(np.all(session == -1)),
        "samples_per_image": {name: int(p.images.shape[1]) for name, p in pairs.items()},
        "ground_truth_resolution": int(gt.shape[1]),
        "reconstruction_resolution": {name: int(p.images.shape[2]) for name, p in pairs.items()},
        "resize": (f"uint8/255 to float, Pillow BILINEAR per channel to {metrics.REFERENCE_SIZE} px then to "
                   f"{metrics.METRIC_SIZE} px (an image already at a size is not resampled)"),
        "pixcorr": "Pearson r of flattened RGB at 425 px",
        "ssim": f"rgb2gray, Gaussian window sigma {metrics.SSIM_SIGMA}, population covariance, data_range 1 at 425 px",
        "sample_averaging": "each metric is computed per (image, sample) and averaged over the samples of an image; "
                            "identification is computed per sample index across all test images, then averaged",
        "identification": "two-way: fraction of other ground truths whose correlation with the prediction is "
                          "lower than the true pair's (ties 0.5); chance 0.5",
        "vae_space": "posterior mean of the VAE at the model's native resolution (LANCZOS resize), flattened",
        "classifier_space": "penultimate layer of the attribute classifier (trained on procedural scenes)",
        "attribute_agreement": "fraction of an image's samples whose predicted attribute equals the prediction "
                               "on the stimulus; chance = sum_c p(c)^2 over the stimuli's predicted classes",
        "ceiling": "pair 'ceiling': the test images' true z and c through the same generator, noise and samples",
        "floors": "shuffled_stimuli: each test image scored against another test stimulus (a seeded derangement); "
                  "mean_train_image: against the pixel mean of the unique training stimuli; one sample each",
        "differences": "a - b per test image, summarised like a metric: the bootstrap resamples images, so it is paired",
        "summary": f"mean over images, SEM (ddof 1), {cfg.ci_level:.0%} percentile bootstrap CI "
                   f"({cfg.n_boot} resamples, seed {cfg.seed}); undefined per-image scores are left out and counted",
    }


def _write_per_image(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def run(cfg: EvaluateConfig, dataset: str) -> Path:
    """Evaluate every pair of ``cfg.pairs`` for ``dataset``; returns the output folder.

    Writes ``<out_dir>/<dataset>/per_image.csv`` (one row per pair x test item),
    ``metrics.json`` and ``grid.png``, each atomically.
    """
    from brainldm.train.evaluation import figures

    if not cfg.pairs:
        raise EvaluateError("evaluate.pairs is empty; expected at least one reconstruction pair, e.g. [baseline, ours]")
    # 1. Ground truth and every pair's reconstructions (all checked before any scoring).
    prepared = Path(cfg.prepared_dir) / f"{dataset}.h5"
    gt, image_index = load_ground_truth(prepared)
    if len(gt) < 2:
        raise EvaluateError(f"{prepared}: {len(gt)} test images; identification needs at least 2")
    if any(len(pair) != 2 for pair in cfg.differences):
        raise EvaluateError(f"evaluate.differences: {list(map(list, cfg.differences))}; expected pairs of names [a, b]")
    unknown = sorted({name for pair in cfg.differences for name in pair} - set(cfg.pairs))
    if unknown:
        raise EvaluateError(f"evaluate.differences: pair(s) {unknown} are not in evaluate.pairs {list(cfg.pairs)}")
    pairs = {name: load_pair(Path(cfg.reconstruct_dir) / dataset / name, image_index) for name in cfg.pairs}
    # 2. Feature spaces, then per-image scores per pair.
    classifier = attribute_classifier.load_classifier(cfg.classifier)
    spaces, status = feature_spaces(cfg, classifier)
    scores = {name: score_pair(gt, pair.images, spaces, classifier) for name, pair in pairs.items()}
    summary = {name: summarise_scores(values, cfg) for name, values in scores.items()}
    # 3. Floors (no brain signal: computed from the stimuli themselves) and paired differences.
    floors = {name: summarise_scores(score_pair(gt, images, spaces, classifier), cfg)
              for name, images in floor_images(gt, prepared, cfg.seed).items()}
    differences = {f"{a}-{b}": summarise_scores(paired_difference(scores[a], scores[b]), cfg) for a, b in cfg.differences}
    # 4. Outputs: per-image table, summary with floors, chance and protocol, figure.
    out = Path(cfg.out_dir) / dataset
    _write_per_image(out / "per_image.csv", [{"pair": name, "test_item": i, "image_index": int(image_index[i]),
                                              **{m: float(v[i]) for m, v in values.items()}}
                                             for name, values in scores.items() for i in range(len(gt))])
    chance = {**{f"ident_{s}": IDENTIFICATION_CHANCE for s in spaces
                 if MINDEYE_SPACES.get(s, ("identification",))[0] == "identification"},
              **attribute_chance(attribute_classifier.predict_attributes(classifier, gt))}
    result = {"dataset": dataset, "pairs": summary, "floors": floors, "differences": differences, "chance": chance,
              "feature_spaces": status, "protocol": protocol(cfg, prepared, gt, pairs), "config": config_to_dict(cfg)}
    write_text_atomic(out / "metrics.json", json.dumps(result, indent=2, sort_keys=True))
    figures.reconstruction_grid(gt, {name: p.images for name, p in pairs.items()}, out / "grid.png",
                                n_items=cfg.grid_items, dpi=cfg.grid_dpi)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    args = parser.parse_args(argv)
    return run_stage(lambda: f"wrote {run(load_config(EvaluateConfig, 'evaluate', args.params), args.dataset)}")


if __name__ == "__main__":
    sys.exit(main())
