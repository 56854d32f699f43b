"""What the reference reconstruction (train/reconstruction/reconstruct.py) and the runtime must compute alike.

The seeded noise: every (seed, item, sample, stream) draws its own numpy stream, so that
the lean runtime (no torch) reproduces the reference's noise exactly and the composition
of a batch never changes an image. The image quantisation: float images in [0, 1] ->
uint8 as every PNG of the project is written.
"""
from __future__ import annotations

import numpy as np

# Noise streams: the VAE posterior sample of the re-encoding, the forward-diffusion noise.
NOISE_STREAM_POSTERIOR = 0
NOISE_STREAM_DIFFUSION = 1
UINT8_MAX = 255


def numpy_noise(seed: int, item: int, sample: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise of one (item, sample, stream): float32 of ``shape``."""
    rng = np.random.default_rng([seed, item, sample, stream])
    return rng.standard_normal(shape, dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (any shape) -> uint8: rint(x * 255) (ties to even), clipped to [0, 255]."""
    return np.clip(np.rint(images * UINT8_MAX), 0, UINT8_MAX).astype(np.uint8)
