"""Ridge baseline decoder: voxel standardisation, intercept, one alpha per target by K-fold CV.

Model (the linear baseline of Takagi & Nishimoto, with an intercept)::

    x_s   = (x - x_mean) / x_std             per voxel, statistics of the training trials
    y_hat = x_s @ coef + intercept           intercept = training mean of each target
    coef_k = argmin ||y_k - b_k - X_s c||^2 + alpha_k ||c||^2     (intercept b_k unpenalised)

``alpha_k`` is picked per target from a grid by K-fold cross-validation: the smallest mean
held-out MSE over folds (himalaya's default criterion).  Inside each fold the intercept is
refitted on that fold's training rows, exactly as sklearn / himalaya ``fit_intercept=True``.

Algorithm: ONE symmetric eigendecomposition for the whole fit
---------------------------------------------------------------
Notation: X_s (n, V) standardised training matrix (columns sum to 0), Y_c = Y - y_mean,
v = validation rows of a fold, 1 = column of ones.

* primal (n >= V): G = X_s^T X_s = Q diag(lam) Q^T,  A = X_s Q,  w(alpha) = 1 / (lam + alpha)
* dual   (n <  V): X_s X_s^T = U diag(lam) U^T,      A = U,      w(alpha) = lam / (lam + alpha)

With the intercept as an unpenalised column of ones, the full-data normal matrix is
block-diagonal (X_s^T 1 = 0), so for every alpha::

    hat matrix   H(alpha) = A diag(w) A^T + 1 1^T / n
    fitted       Y_hat    = A diag(w) Z + y_mean,     Z = A^T Y_c            (V or n, K)
    refit coef   (X^T X + alpha I)^-1 X^T Y = Q diag(1/(lam+alpha)) Q^T X_s^T Y_c
                                            = Q diag(1/(lam+alpha)) Z       (primal)
                 X^T (X X^T + alpha I)^-1 Y = X_s^T U diag(1/(lam+alpha)) Z (dual)

Deleting the validation rows v of a fold (Sherman-Morrison-Woodbury on the rows) gives the
residuals of the model refitted WITHOUT those rows (intercept and all) from the full fit::

    E_v(alpha) = (I - H_vv(alpha))^-1 (Y_v - Y_hat_v(alpha))

so each fold costs an (n_v x n_v) Cholesky per alpha instead of its own eigendecomposition.
The dual evaluates I - H and Y_c - Y_hat through c = 1 - w = alpha / (lam + alpha) (U is
complete), which keeps float32 accurate when the full fit nearly interpolates.

Why this formulation (FLOPs at the NSD shape n = 24,980, V = 10,631, K = 6,400, n_v = n/5,
7 alphas; one multiply-add = 2 FLOPs).  On the 2-core machine float32 GEMM runs at
~130-180 GFLOP/s and ``eigh`` (ssyevd) of a 10,631 x 10,631 matrix takes ~60 s.

* per-fold eigendecomposition of X_tr^T X_tr (the textbook route): 6 eigh plus ~46 TFLOP,
  and a (V, V) rotation per fold.  himalaya's ``RidgeCV`` (numpy) takes an SVD of every
  fold's X_tr and builds a (V, n_tr) resolution matrix per alpha: ~450 TFLOP (2,610 s).
* this module: G 2.8 (syrk) + 1 eigh + A = X_s Q 5.6 + Z 3.4 + per alpha [fitted values
  2nVK = 3.4, H_vv blocks sum(n_v^2 V) = 1.3, Cholesky + solves sum(2 n_v^2 K) = 1.8]
  x 7 = 45 + refit 2V^2K = 1.4  ->  ~59 TFLOP and 1 eigh.  (X^T Y and the per-fold
  X_tr^T Y_tr are never formed: Z = A^T Y_c carries all target information.)
* memory: X_s, A (n, V), Y_c (n, K), Z and coef (V, K): ~5 GB at the NSD shape; targets are
  processed in chunks of ``target_chunk`` so temporaries stay (n_v, chunk).

The fold loop calls scipy's BLAS/LAPACK (ssyrk, sgemm, spotrf, spotrs) on Fortran-ordered
views only: numpy and scipy each bundle their own OpenBLAS, whose idle threads spin for a
while after a call, so alternating numpy matmuls with scipy solves stalls both pools.

If a fold's system is singular for an alpha (I - H_vv not positive definite: fewer
training rows than voxels and a vanishing alpha), that alpha is excluded for all targets.
numpy/scipy only (no torch), float32 throughout, scores accumulated in float64.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path

FORMAT_NAME = "brainldm.ridge"
FORMAT_VERSION = 1
STATS_ROW_CHUNK = 4096  # rows per pass when standardising (bounds float64 temporaries)
MIN_FOLDS = 2
_ARRAY_FIELDS = ("x_mean", "x_std", "coef", "intercept", "alpha_per_target", "cv_score")


@dataclasses.dataclass
class RidgeModel:
    """A fitted ridge decoder.

    Attributes:
        x_mean, x_std: (V,) float32 voxel statistics of the training trials (std > 0).
        coef: (V, K) float32 weights on standardised voxels.
        intercept: (K,) float32, the training mean of each target.
        alpha_per_target: (K,) float32, the alpha picked by cross-validation.
        cv_score: (K,) float32, mean held-out R^2 over folds at that alpha (<= 1).
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    alpha_per_target: np.ndarray
    cv_score: np.ndarray

    def __post_init__(self) -> None:
        for name in _ARRAY_FIELDS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32))
        n_voxels, n_targets = self.coef.shape if self.coef.ndim == 2 else (-1, -1)
        expected = {"x_mean": (n_voxels,), "x_std": (n_voxels,), "intercept": (n_targets,),
                    "alpha_per_target": (n_targets,), "cv_score": (n_targets,)}
        for name, shape in expected.items():
            if self.coef.ndim != 2 or getattr(self, name).shape != shape:
                raise ValueError(f"RidgeModel: {name} has shape {getattr(self, name).shape}, expected "
                                 f"{shape} to match coef {self.coef.shape} (V voxels, K targets)")

    @property
    def n_voxels(self) -> int:
        return self.coef.shape[0]

    @property
    def n_targets(self) -> int:
        return self.coef.shape[1]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict targets: X (n, V) raw voxel responses -> (n, K) float32."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"predict: X must be 2-D (trials, voxels), got shape {X.shape}")
        if X.shape[1] != self.n_voxels:
            raise ValueError(f"predict: X has {X.shape[1]} voxels but the model was fitted on "
                             f"{self.n_voxels} voxels")
        if not np.all(np.isfinite(X)):
            raise ValueError("predict: X contains NaN or Inf values")
        X_s = (X.astype(np.float32, copy=False) - self.x_mean) / self.x_std
        return (X_s @ self.coef + self.intercept).astype(np.float32, copy=False)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the model atomically as safetensors; ``metadata`` (JSON-able) is stored inside."""
        from safetensors.numpy import save_file

        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "n_voxels": self.n_voxels,
                  "n_targets": self.n_targets, "metadata": metadata or {}}
        tensors = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"config": json.dumps(header, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> RidgeModel:
        """Read a model written by :meth:`save` (clear errors for a missing or foreign file)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ridge model file not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                header = json.loads((handle.metadata() or {}).get("config", "{}"))
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable safetensors ridge model ({exc})") from exc
        if header.get("format") != FORMAT_NAME or set(arrays) != set(_ARRAY_FIELDS):
            raise ValueError(f"{path}: not a {FORMAT_NAME} file (format {header.get('format')!r}, "
                             f"tensors {sorted(arrays)}; expected {sorted(_ARRAY_FIELDS)})")
        return cls(**arrays)

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """Return the user metadata dict stored by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            return json.loads((handle.metadata() or {}).get("config", "{}")).get("metadata", {})


def make_folds(n: int, n_folds: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Deterministic fold id (n,) int64 in [0, n_folds) for each sample.

    Without groups: contiguous blocks, the first ``n % n_folds`` folds one row larger
    (sklearn ``KFold`` without shuffling).  With groups (e.g. image ids): GroupKFold-like,
    groups sorted by size (descending, ties by group id) go to the currently smallest fold,
    so repeats of one image never straddle training and validation rows.
    """
    if groups is None:
        sizes = np.full(n_folds, n // n_folds) + (np.arange(n_folds) < n % n_folds)
        return np.repeat(np.arange(n_folds), sizes).astype(np.int64)
    labels, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(labels) < n_folds:
        raise ValueError(f"groups: {len(labels)} distinct groups but n_folds={n_folds}; "
                         "need at least one group per fold")
    order = np.lexsort((labels, -counts))
    fold_of_group = np.empty(len(labels), dtype=np.int64)
    load = np.zeros(n_folds, dtype=np.int64)
    for g in order:
        fold = int(np.argmin(load))
        fold_of_group[g] = fold
        load[fold] += counts[g]
    return fold_of_group[inverse.ravel()]


def fit_ridge_cv(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float], n_folds: int = 5,
                 groups: np.ndarray | None = None, target_chunk: int = 1000,
                 progress: bool = True) -> RidgeModel:
    """Fit ridge with intercept, choosing one alpha per target by K-fold CV.

    Args:
        X: (n, V) float32 training voxel responses (any scale; standardised here).
        Y: (n, K) float32 training targets (need not be centred).
        alphas: grid of positive ridge penalties (on standardised voxels).
        n_folds: number of CV folds (>= 2, <= n, <= number of groups).
        groups: optional (n,) int group labels (image ids); folds never split a group.
        target_chunk: targets processed at once (bounds temporary memory).
        progress: show a tqdm bar over (fold, alpha) steps.
    Returns:
        RidgeModel refitted on all rows with each target's alpha.
    """
    X, Y, alpha_grid, groups = _validate(X, Y, alphas, n_folds, groups, target_chunk)
    fold_id = make_folds(X.shape[0], n_folds, groups)
    # 1. standardise voxels and centre targets with training statistics
    x_mean, x_std = _column_stats(X)
    X_s = _standardise(X, x_mean, x_std)
    y_mean = Y.mean(axis=0, dtype=np.float64).astype(np.float32)
    Y_c = Y - y_mean
    # 2. the single eigendecomposition and the spectral coordinates of the data
    primal = X.shape[0] >= X.shape[1]
    lam, basis, A = _spectral_basis(X_s, primal)
    if primal:
        del X_s  # the primal refit needs only Q and Z
    # Z = A^T Y_c, built as (Y_c^T A)^T: a Fortran-ordered view that scipy's BLAS takes as is
    Z = (Y_c.T @ A).T
    # 3. held-out errors of every fold, alpha and target from the full-data fit
    mse, r2 = _cv_errors(A, lam, primal, Z, Y_c, fold_id, alpha_grid, target_chunk, progress)
    best = _select_alphas(mse, alpha_grid)
    # 4. refit on all rows with each target's alpha
    alpha_k = alpha_grid[best].astype(np.float32)
    coef = _refit(lam, basis, Z, alpha_k, None if primal else X_s, target_chunk)
    cv_score = r2[best, np.arange(Y.shape[1])]
    return RidgeModel(x_mean, x_std, coef, y_mean, alpha_k, cv_score)


def _validate(X, Y, alphas, n_folds, groups, target_chunk):
    X = np.asarray(X)
    Y = np.asarray(Y)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (trials, voxels), got shape {X.shape}")
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (trials, targets), got shape {Y.shape}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; expected one row per trial")
    if min(X.shape) == 0 or Y.shape[1] == 0:
        raise ValueError(f"empty input: X {X.shape}, Y {Y.shape}")
    for name, arr in (("X", X), ("Y", Y)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or Inf values")
    alpha_grid = np.asarray(alphas, dtype=np.float64).ravel()
    if alpha_grid.size == 0 or not np.all(np.isfinite(alpha_grid)) or np.any(alpha_grid <= 0):
        raise ValueError(f"alphas must be a non-empty sequence of positive finite numbers, got {alphas!r}")
    if int(n_folds) != n_folds or n_folds < MIN_FOLDS:
        raise ValueError(f"n_folds must be an integer >= {MIN_FOLDS}, got {n_folds!r}")
    if X.shape[0] < n_folds:
        raise ValueError(f"{X.shape[0]} samples is fewer than n_folds={n_folds}")
    if int(target_chunk) != target_chunk or target_chunk < 1:
        raise ValueError(f"target_chunk must be a positive integer, got {target_chunk!r}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (X.shape[0],) or not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(f"groups must be an integer array of shape ({X.shape[0]},), got "
                             f"{groups.dtype} {groups.shape}")
    return X.astype(np.float32, copy=False), Y.astype(np.float32, copy=False), alpha_grid, groups


def _column_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and std (ddof 0) in float64 over row chunks; zero std -> 1 (sklearn)."""
    n = X.shape[0]
    total = np.zeros(X.shape[1])
    for start in range(0, n, STATS_ROW_CHUNK):
        total += X[start:start + STATS_ROW_CHUNK].sum(axis=0, dtype=np.float64)
    mean = total / n
    squares = np.zeros(X.shape[1])
    for start in range(0, n, STATS_ROW_CHUNK):
        squares += np.square(X[start:start + STATS_ROW_CHUNK] - mean).sum(axis=0)
    std = np.sqrt(squares / n)
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _standardise(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = np.empty(X.shape, dtype=np.float32)
    for start in range(0, X.shape[0], STATS_ROW_CHUNK):
        rows = slice(start, start + STATS_ROW_CHUNK)
        np.divide(X[rows] - mean, std, out=out[rows])
    return out


def _spectral_basis(X_s: np.ndarray, primal: bool):
    """Eigenvalues lam (r,), basis (Q (V, V) or U (n, n)) and A = X_s Q or U (n, r)."""
    # X_s.T @ X_s and X_s @ X_s.T dispatch to BLAS syrk (half the FLOPs of a GEMM)
    gram = X_s.T @ X_s if primal else X_s @ X_s.T
    lam, basis = scipy.linalg.eigh(gram, driver="evd", overwrite_a=True, check_finite=False)
    del gram
    if not primal:
        # the constant vector is an exact null vector of the centred kernel, but round-off
        # leaves its eigenvalue at ~eps*lam_max: the complement form needs exactly c = 1 there
        lam[np.argmax(np.abs(basis.sum(axis=0)))] = 0.0
    # float32 round-off can push null-space eigenvalues slightly below zero
    lam = np.maximum(lam, 0).astype(np.float32)
    A = X_s @ basis if primal else basis
    return lam, basis, A


def _filter(lam: np.ndarray, alpha: float, primal: bool) -> np.ndarray:
    """Spectral weights p(alpha), float32: w = 1/(lam+alpha) (primal) or c = alpha/(lam+alpha) (dual).

    The dual works with the complement c = 1 - w, because there U is complete (U U^T = I):
    I - H = U diag(c) U^T - 1 1^T/n and Y_c - Y_hat = U diag(c) Z, both free of the
    cancellation 1 - w that ruins float32 when the full fit nearly interpolates (n < V).
    """
    lam64 = lam.astype(np.float64)
    p = 1.0 / (lam64 + alpha) if primal else alpha / (lam64 + alpha)
    return p.astype(np.float32)


def _cv_errors(A, lam, primal, Z, Y_c, fold_id, alphas, target_chunk, progress):
    """Mean over folds of held-out MSE and R^2, each (n_alphas, K) float64 (MSE inf = unusable)."""
    n, n_targets = Y_c.shape
    n_folds = int(fold_id.max()) + 1
    mse = np.zeros((len(alphas), n_targets))
    r2 = np.zeros((len(alphas), n_targets))
    bar = tqdm(total=n_folds * len(alphas), desc="ridge cv (fold x alpha)", disable=not progress)
    for fold in range(n_folds):
        rows = np.flatnonzero(fold_id == fold)
        A_v, Y_v = A[rows], Y_c[rows]
        sst = np.square(Y_v - Y_v.mean(axis=0)).sum(axis=0, dtype=np.float64)
        for a, alpha in enumerate(alphas):
            p = _filter(lam, alpha, primal)
            factor = _deletion_factor(A_v, p, n, primal)
            if factor is None:
                mse[a] = np.inf
            else:
                sse = _held_out_sse(factor, A_v * p, Y_v, Z, target_chunk, primal)
                mse[a] += sse / len(rows)
                r2[a] += 1.0 - np.divide(sse, sst, out=np.ones_like(sse), where=sst > 0)
            bar.update()
    bar.close()
    return mse / n_folds, r2 / n_folds


def _deletion_factor(A_v: np.ndarray, p: np.ndarray, n: int, primal: bool) -> np.ndarray | None:
    """Upper Cholesky factor (Fortran order) of I - H_vv (n_v, n_v); None if not positive definite.

    primal: I - H_vv = I - A_v diag(w) A_v^T - 1/n;  dual: I - H_vv = A_v diag(c) A_v^T - 1/n.
    """
    B = A_v * np.sqrt(p)
    M = blas.ssyrk(1.0, B.T, trans=1)  # B B^T, upper triangle only, Fortran order
    if primal:
        M += np.float32(1.0 / n)
        np.negative(M, out=M)
        M[np.diag_indices_from(M)] += 1.0
    else:
        M -= np.float32(1.0 / n)
    factor, info = lapack.spotrf(M, lower=0, clean=0, overwrite_a=1)
    return factor if info == 0 else None


def _held_out_sse(factor, A_p, Y_v, Z_f, target_chunk, primal):
    """Sum of squared held-out residuals (K,) float64: E_v = (I - H_vv)^-1 (Y_v - Y_hat_v).

    Y_v - Y_hat_v = Y_v - A_v diag(w) Z (primal) or A_v diag(c) Z (dual); A_p = A_v diag(p),
    Z_f = Z in Fortran order so that every operand reaches BLAS/LAPACK without a copy.
    """
    sse = np.empty(Y_v.shape[1])
    for start in range(0, Y_v.shape[1], target_chunk):
        cols = slice(start, start + target_chunk)
        resid = blas.sgemm(1.0, A_p.T, Z_f[:, cols], trans_a=1)  # A_p @ Z, Fortran order
        if primal:
            np.subtract(Y_v[:, cols], resid, out=resid)
        resid, info = lapack.spotrs(factor, resid, lower=0, overwrite_b=1)
        if info != 0:
            raise RuntimeError(f"LAPACK spotrs failed (info={info}) in the ridge fold solve")
        sse[cols] = np.einsum("ij,ij->j", resid, resid, dtype=np.float64)
    return sse


def _select_alphas(mse: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Index (K,) of the alpha with the lowest mean held-out MSE (ties: first in the grid)."""
    if np.all(np.isinf(mse)):
        raise ValueError(f"no alpha in {alphas.tolist()} gives a well-posed fit in every fold "
                         "(fewer training rows than voxels?); use larger alphas")
    return np.argmin(mse, axis=0)


def _refit(lam, basis, Z, alpha_k, X_s, target_chunk):
    """Coefficients (V, K) float32 on all rows with each target's own alpha (see module doc)."""
    n_targets = Z.shape[1]
    # the dual's null space maps to zero weights: drop it rather than divide its round-off
    # by a small alpha
    null = lam == 0
    coef = np.empty((basis.shape[0] if X_s is None else X_s.shape[1], n_targets), dtype=np.float32)
    for start in range(0, n_targets, target_chunk):
        cols = slice(start, start + target_chunk)
        scaled = Z[:, cols] / (lam[:, None] + alpha_k[None, cols])
        if X_s is not None:
            scaled[null] = 0.0
        if X_s is None:
            coef[:, cols] = basis @ scaled
        else:
            coef[:, cols] = X_s.T @ (basis @ scaled)
    return coef
