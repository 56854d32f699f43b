"""Runtime preprocessing: raw betas -> z-scored, repeat-averaged decoder inputs; image resizing.

The arithmetic is the prepare stage's (train/data/prepare.py ``normalise`` and
``average_images``), so raw test trials reproduce the prepared test split:

    z = (betas - mean[session]) / std[session]          float32, per trial
    x_item = mean over the item's trials of z           accumulated in float64, stored float32

Items: without ``group`` every row is one item, in row order. With ``group`` (e.g. the
image index of each trial) the items are the unique group ids in ascending order, so
item i is the i-th smallest id. That is how the reference numbers its test items: the
test split holds one row per test image sorted by image row (prepare.average_images
over ``np.flatnonzero(image_is_test)``), and test item i seeds the noise of its samples.
"""
from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Bad runtime input (shape, values, sessions, groups)."""


# A z-scored trial's root-mean-square over voxels is about 1 (its session's statistics make
# it 1 on average over the training trials) and a few at most for a noisy trial. Betas in
# another unit are far beyond: NSD's int16 files hold percent signal change x 300, raw BOLD
# is in the hundreds to thousands. 50 lies between the two.
MAX_TRIAL_RMS_Z = 50.0
NSD_INT16_SCALE = 300  # NSD stores betas as int16 percent signal change x 300


def check_betas(betas: np.ndarray, n_voxels: int) -> np.ndarray:
    """Validate raw ``betas (n, n_voxels)`` (float, finite, non-empty); returns them as float32."""
    betas = np.asarray(betas)
    if betas.ndim != 2 or betas.shape[1] != n_voxels:
        raise InputError(f"betas have shape {betas.shape}; expected (n_trials, {n_voxels}) with columns in the "
                         "bundle's voxel_ids order (arrays/voxel_ids.npy)")
    if betas.shape[0] == 0:
        raise InputError("betas are empty (0 trials); expected at least one row")
    if betas.dtype.kind in "iu":
        raise InputError(f"betas have integer dtype {betas.dtype}; expected float responses in percent signal "
                         f"change, the unit of the bundle's statistics (NSD's int16 betas: divide by "
                         f"{NSD_INT16_SCALE} first)")
    if betas.dtype.kind != "f":
        raise InputError(f"betas have dtype {betas.dtype}; expected a float array")
    betas = betas.astype(np.float32, copy=False)
    bad = ~np.isfinite(betas)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise InputError(f"betas contain {int(bad.sum())} NaN/Inf values (rows {rows[:5].tolist()}...); "
                         "expected finite responses")
    return betas


def check_scale(z: np.ndarray) -> None:
    """Refuse z-scored trials ``z (n, V)`` whose size no response has: betas in another unit."""
    rms = np.sqrt(np.mean(np.square(z, dtype=np.float64), axis=1))
    rows = np.flatnonzero(rms > MAX_TRIAL_RMS_Z)
    if len(rows):
        raise InputError(f"betas are not on the scale of the bundle's statistics: {len(rows)} of {len(z)} trials "
                         f"z-score to a root-mean-square of up to {rms.max():.3g} (rows {rows[:5].tolist()}...); "
                         f"expected about 1 and at most {MAX_TRIAL_RMS_Z:g}: pass percent signal change "
                         f"(NSD's int16 betas divided by {NSD_INT16_SCALE})")


def session_rows(session: np.ndarray | int | None, n: int, sessions: np.ndarray) -> np.ndarray:
    """(n,) int64 rows into the bundle's statistics for each trial's 1-based ``session``.

    ``session`` may be None when the bundle has a single session, or one int for all trials.
    """
    if session is None:
        if len(sessions) != 1:
            raise InputError(f"session is required: the bundle has statistics for {len(sessions)} sessions "
                             f"{sessions.tolist()}; pass one session per trial")
        return np.zeros(n, np.int64)
    session = np.broadcast_to(np.asarray(session), (n,)) if np.ndim(session) == 0 else np.asarray(session)
    if session.shape != (n,) or not np.issubdtype(session.dtype, np.integer):
        raise InputError(f"session has shape {session.shape} dtype {session.dtype}; expected ({n},) integers")
    lookup = {int(s): k for k, s in enumerate(sessions)}
    unknown = sorted({int(s) for s in session} - set(lookup))
    if unknown:
        raise InputError(f"unknown session(s) {unknown}; the bundle has normalisation statistics for sessions "
                         f"{sessions.tolist()}")
    return np.array([lookup[int(s)] for s in session], np.int64)


def zscore(betas: np.ndarray, rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(n, V) float32 z-scores: each trial with its session's statistics (mean, std (S, V) float32)."""
    out = np.empty(betas.shape, np.float32)
    for k in np.unique(rows):  # per session, like prepare.normalise: no (n, V) copy of the statistics
        sel = np.flatnonzero(rows == k)
        out[sel] = (betas[sel] - mean[k]) / std[k]
    return out


def group_items(group: np.ndarray | None, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(item ids (m,), trial rows per item): unique groups ascending, or one item per row."""
    if group is None:
        return np.arange(n, dtype=np.int64), [np.array([i]) for i in range(n)]
    group = np.asarray(group)
    if group.shape != (n,):
        raise InputError(f"group has shape {group.shape}; expected ({n},), one id per trial")
    if group.dtype.kind not in "iu":
        raise InputError(f"group has dtype {group.dtype}; expected integer ids (e.g. image indices)")
    ids, inverse = np.unique(group, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
    return ids.astype(np.int64), [order[bounds[k]:bounds[k + 1]] for k in range(len(ids))]


def average(z: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """(m, V) float32: the float64 mean of each item's trials, as prepare.average_images."""
    out = np.empty((len(members), z.shape[1]), np.float32)
    for k, rows in enumerate(members):
        out[k] = z[rows].astype(np.float64).mean(axis=0)
    return out


def preprocess(betas: np.ndarray, session, group, bundle) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw betas -> (item ids (m,), {"z": (m, V_z), "c": (m, V_c)} float32 decoder inputs)."""
    betas = check_betas(betas, len(bundle.voxel_ids))
    rows = session_rows(session, len(betas), bundle.sessions)
    ids, members = group_items(group, len(betas))
    z = zscore(betas, rows, bundle.mean, bundle.std)
    check_scale(z)
    x = average(z, members)
    return ids, {key: np.ascontiguousarray(x[:, cols]) for key, cols in bundle.columns.items()}


# Keys' cubic convolution parameter A = -0.75, torch's upsample_bicubic2d constant.
CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n, 4) Keys weights of taps at offsets -1, 0, 1, 2 for fractional positions t in [0, 1)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of torch's bicubic interpolation along one axis.

    Matches ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)``: source
    coordinate (dst + 0.5) * n_in / n_out - 0.5, four taps with indices clamped to the border.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((n_out, n_in))
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
        np.add.at(matrix, (np.arange(n_out), idx), weights[:, tap])
    return matrix


def resize_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """(B, C, H, W) float32 -> (B, C, size, size) float32, torch-bicubic then clamped to [-1, 1].

    Computed in float64 as two matrix products (rows, then columns), so it differs from
    torch's float32 loop only by rounding (~1e-6).
    """
    rows = bicubic_matrix(images.shape[2], size)
    cols = bicubic_matrix(images.shape[3], size)
    out = np.einsum("oh,bchw,pw->bcop", rows, images.astype(np.float64), cols, optimize=True)
    return np.clip(out, -1.0, 1.0).astype(np.float32)
