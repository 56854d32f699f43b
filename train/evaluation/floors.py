"""Reference rows of the reconstruction table: what a metric gives without any brain signal.

A metric's value means something only between its floor and its ceiling. The ceiling is a
reconstruction pair of its own (`reconstruct.pairs.ceiling`: the test images' true targets
through the same generator and noise). The floors here need no generation:

- ``shuffled_stimuli``: each test image is "reconstructed" by another test stimulus (a
  seeded derangement), i.e. a perfect picture of the wrong image;
- ``mean_train_image``: every test image is "reconstructed" by the pixel mean of the
  unique training stimuli (training images only: no test statistic).

Paired differences (e.g. ours - baseline) are summarised per image, so the bootstrap
resamples the same test images for both methods.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

FLOORS = ("shuffled_stimuli", "mean_train_image")


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation (n,) int64 with no fixed point (n >= 2): a seeded random cycle."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # order[i] -> order[i + 1]: one cycle through all items
    return perm


def mean_train_image(prepared: Path) -> np.ndarray:
    """Pixel mean of the unique training stimuli: (H, W, 3) uint8 (rounded)."""
    with h5py.File(prepared, "r") as f:
        if "splits/train/image_index" not in f:
            raise ValueError(f"{prepared}: expected 'splits/train/image_index' (docs/prepared_schema.md)")
        index = np.unique(f["splits/train/image_index"][()].astype(np.int64))
        total = np.zeros(f["images"].shape[1:], dtype=np.float64)
        for i in index:  # one image at a time: NSD's 9,000 training images need not fit at once
            total += f["images"][int(i)]
    return np.rint(total / len(index)).astype(np.uint8)


def floor_images(gt: np.ndarray, prepared: Path, seed: int) -> dict[str, np.ndarray]:
    """Floor name -> its "reconstructions" (n, 1, H, W, 3) uint8 for the test stimuli gt (n, H, W, 3)."""
    mean = mean_train_image(prepared)
    if mean.shape != gt.shape[1:]:
        raise ValueError(f"{prepared}: training images {mean.shape} and test images {gt.shape[1:]} differ in size")
    return {
        "shuffled_stimuli": gt[derangement(len(gt), seed)][:, None],
        "mean_train_image": np.broadcast_to(mean, gt.shape)[:, None].copy(),
    }


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """metric -> per-image differences a - b (n,) float64, for the metrics both pairs have.

    a, b: metric -> (n,) float64 per-image scores of two pairs over the same test images;
    an image undefined in either is NaN in the difference.
    """
    return {name: a[name] - b[name] for name in sorted(set(a) & set(b))}
