"""Reconstruction metrics in the MindEye convention (docs/data-formats.md, "Evaluation definitions").

numpy + scikit-image + Pillow only (no torch), so the metrics can run anywhere.

Resize protocol: images are converted to float32 in [0, 1] FIRST (uint8 / 255) and resized
per channel with Pillow's BILINEAR filter on mode "F" (32-bit float) images, which
antialiases when downsampling. Working in float avoids re-quantising to uint8 between the
256 px and 425 px resizes. An image already at the target size is passed through
untouched, so a 256 px ground truth is resampled exactly once (256 -> 425).

Identification ties (equal correlations, e.g. duplicate ground-truth features) count as
one half; MindEye's strict ``<`` counts them as 0. The two agree whenever no correlations
are tied, which is almost surely the case for continuous features.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from tqdm import tqdm

REFERENCE_SIZE = 256  # ground truth size; reconstructions are resized to it first
METRIC_SIZE = 425  # PixCorr and SSIM are computed at this size (MindEye)
SSIM_SIGMA = 1.5
SSIM_DATA_RANGE = 1.0  # images are float in [0, 1]
UINT8_MAX = 255.0
TIE_ATOL = 1e-12  # float64 correlations closer than this count as tied
BOOT_SAMPLES = 1000
CI_LEVEL = 0.95

ImageBatch = np.ndarray | Sequence[np.ndarray]


def _validate_images(images: ImageBatch, name: str) -> np.ndarray:
    """Return images as one (N, H, W, 3) array; H == W; uint8, or float in [0, 1]."""
    if not isinstance(images, np.ndarray):
        shapes = {np.shape(image) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"{name}: images have different shapes {sorted(shapes)}; expected one (H, W, 3) "
                             "shape for all images")
        images = np.stack([np.asarray(image) for image in images]) if shapes else np.empty((0, 0, 0, 3))
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{name}: shape {images.shape}; expected (N, H, W, 3) RGB images with N >= 1")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{name}: images are {images.shape[1]}x{images.shape[2]}; expected square images")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{name}: dtype {images.dtype}; expected uint8 or float in [0, 1]")
        if images.size and (np.nanmin(images) < 0 or np.nanmax(images) > 1 or np.isnan(images).any()):
            raise ValueError(f"{name}: float images must lie in [0, 1] without NaN")
    return images


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(UINT8_MAX)
    return image.astype(np.float32)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float32 -> (size, size, 3) float32 by per-channel Pillow BILINEAR; identity at size."""
    if image.shape[0] == size:
        return image
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)


def prepare_images(images: ImageBatch, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Images (N, H, W, 3) uint8 (or float in [0, 1]) -> (N, size, size, 3) float32 in [0, 1].

    Bilinear (Pillow, float) resize; images already size x size are returned unresampled.
    """
    batch = _validate_images(images, "prepare_images")
    return np.stack([_resize(_to_unit_float(image), size) for image in batch])


def _protocol_pairs(gt: ImageBatch, pred: ImageBatch, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (gt, pred) per image as (425, 425, 3) float32: each to 256 px first, then to 425 px."""
    gt_batch = _validate_images(gt, f"{desc}: gt")
    pred_batch = _validate_images(pred, f"{desc}: pred")
    if len(gt_batch) != len(pred_batch):
        raise ValueError(f"{desc}: {len(gt_batch)} ground-truth images but {len(pred_batch)} reconstructions; "
                         "expected one reconstruction per ground-truth image")
    for gt_image, pred_image in tqdm(zip(gt_batch, pred_batch), total=len(gt_batch), desc=desc,
                                     disable=len(gt_batch) < 100):
        yield tuple(_resize(_resize(_to_unit_float(image), REFERENCE_SIZE), METRIC_SIZE)
                    for image in (gt_image, pred_image))


def pixcorr(gt: ImageBatch, pred: ImageBatch) -> np.ndarray:
    """PixCorr: Pearson r between flattened RGB pixels at 425 px, per image.

    gt, pred: (N, H, W, 3) uint8 (or float in [0, 1]); N equal. Returns (N,) float64 in [-1, 1]
    (NaN for a constant image, where r is undefined).
    """
    scores = [_pearson_1d(g.ravel(), p.ravel()) for g, p in _protocol_pairs(gt, pred, "pixcorr")]
    return np.asarray(scores, dtype=np.float64)


def ssim(gt: ImageBatch, pred: ImageBatch) -> np.ndarray:
    """Grayscale SSIM at 425 px (Gaussian window, sigma 1.5, population covariance), per image.

    gt, pred: (N, H, W, 3) uint8 (or float in [0, 1]); N equal. Returns (N,) float64 in [-1, 1].
    """
    scores = [structural_similarity(rgb2gray(g), rgb2gray(p), gaussian_weights=True, sigma=SSIM_SIGMA,
                                    use_sample_covariance=False, data_range=SSIM_DATA_RANGE)
              for g, p in _protocol_pairs(gt, pred, "ssim")]
    return np.asarray(scores, dtype=np.float64)


def _pearson_1d(a: np.ndarray, b: np.ndarray) -> float:
    return float(per_sample_pearson(a[None], b[None])[0])


def _features(real: np.ndarray, pred: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate paired features: both (N, F) with N, F >= 1 and finite; returned as float64."""
    real, pred = np.asarray(real, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if real.ndim != 2 or real.shape != pred.shape or real.size == 0:
        raise ValueError(f"{name}: real {real.shape} and pred {pred.shape}; expected two equal (N, F) arrays")
    if not (np.isfinite(real).all() and np.isfinite(pred).all()):
        raise ValueError(f"{name}: features contain NaN or inf")
    return real, pred


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, so that row dot products are Pearson r (NaN if constant)."""
    centred = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return centred / norm


def per_sample_pearson(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson r between real[i] and pred[i]; real, pred (N, F). Returns (N,) float64 (NaN if constant)."""
    real, pred = _features(real, pred, "per_sample_pearson")
    return np.einsum("nf,nf->n", _zscore_rows(real), _zscore_rows(pred))


def per_dimension_pearson(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson r over samples for each feature f; real, pred (N, F), N >= 2. Returns (F,) float64."""
    real, pred = _features(real, pred, "per_dimension_pearson")
    return per_sample_pearson(real.T, pred.T)


def correlation_distance(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """1 - Pearson r per sample (EffNet-B1 / SwAV reporting; lower is better). Returns (N,) in [0, 2]."""
    return 1.0 - per_sample_pearson(real, pred)


def mse(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Mean squared error per sample over features; real, pred (N, F). Returns (N,) float64 >= 0."""
    real, pred = _features(real, pred, "mse")
    return np.mean((real - pred) ** 2, axis=1)


def cross_correlation(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """r[i, j] = Pearson(real[i], pred[j]); real, pred (N, F). Returns (N, N) float64."""
    real, pred = _features(real, pred, "cross_correlation")
    return _zscore_rows(real) @ _zscore_rows(pred).T


def identification_from_correlations(r: np.ndarray) -> np.ndarray:
    """Two-way identification per prediction from r[i, j] = corr(ground truth i, prediction j).

    For each j: the fraction of the N - 1 other ground truths i with r[i, j] < r[j, j], a tie
    (|difference| <= TIE_ATOL) counting 0.5. r: (N, N), N >= 2. Returns (N,) float64 in [0, 1]
    (chance 0.5); the mean is the identification accuracy.
    """
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 2:
        raise ValueError(f"identification: correlation matrix shape {r.shape}; expected (N, N) with N >= 2")
    if not np.isfinite(r).all():
        raise ValueError("identification: correlations contain NaN or inf (a constant feature vector?)")
    congruent = np.diag(r)[None, :]  # r[j, j], broadcast down column j
    tied = np.abs(r - congruent) <= TIE_ATOL
    wins = (r < congruent) & ~tied
    off_diagonal = ~np.eye(len(r), dtype=bool)
    score = (wins & off_diagonal).sum(axis=0) + 0.5 * (tied & off_diagonal).sum(axis=0)
    return score / (len(r) - 1)


def two_way_identification(real_features: np.ndarray, pred_features: np.ndarray) -> np.ndarray:
    """Two-way identification in a feature space; real_features, pred_features (N, F), N >= 2.

    Returns (N,) float64 in [0, 1] per prediction; ``.mean()`` is the reported accuracy.
    """
    return identification_from_correlations(cross_correlation(real_features, pred_features))


def bootstrap_ci(values: np.ndarray, n_boot: int = BOOT_SAMPLES, level: float = CI_LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean over test images.

    values (N,) finite per-image scores; resamples images with replacement n_boot times
    (seeded, so deterministic). Returns (low, high).
    """
    values = _finite_1d(values, "bootstrap_ci")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: n_boot={n_boot}, level={level}; expected n_boot >= 1, 0 < level < 1")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def _finite_1d(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name}: values shape {values.shape}; expected (N,) with N >= 1")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: {int((~np.isfinite(values)).sum())} non-finite values (e.g. PixCorr of a "
                         "constant image); expected finite per-image scores")
    return values


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean over N test images, its standard error (ddof 1; 0 when N = 1) and bootstrap CI."""

    mean: float
    sem: float
    ci_low: float
    ci_high: float
    n: int
    level: float


def summarise(values: np.ndarray, n_boot: int = BOOT_SAMPLES, level: float = CI_LEVEL, seed: int = 0) -> Summary:
    """Summary of per-image scores values (N,); use dataclasses.asdict for JSON."""
    values = _finite_1d(values, "summarise")
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    low, high = bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed)
    return Summary(mean=float(values.mean()), sem=sem, ci_low=low, ci_high=high, n=len(values), level=level)
