"""Ridge's contracts at their edges, written against the mutants that survived test_ridge.py
(docs/mutation-survivors.tsv): row chunks of the voxel statistics, the smallest legal inputs,
each validation condition alone, R^2 of small-variance targets, the grouped folds' order."""
import numpy as np
import pytest

from brainldm.train.decoding import ridge
from tests.train.decoding.test_ridge import ALPHAS, N_FOLDS, _brute_force, _data


@pytest.mark.parametrize("n,V", [(150, 40), (40, 120)], ids=["primal", "dual"])
def test_statistics_over_several_row_chunks_match_one_pass(monkeypatch, n, V):
    """NSD's 25k trials are standardised in row chunks; a chunk smaller than n exercises that path."""
    X, Y = _data(n, V, K=6, seed=11)
    monkeypatch.setattr(ridge, "STATS_ROW_CHUNK", 16)
    model = ridge.fit_ridge_cv(X, Y, ALPHAS, N_FOLDS, progress=False)
    x64 = X.astype(np.float64)
    np.testing.assert_allclose(model.x_mean, x64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.x_std, x64.std(0), rtol=1e-6)
    alpha_ref, coef_ref, _ = _brute_force(X, Y, ALPHAS, ridge.make_folds(n, N_FOLDS))
    np.testing.assert_array_equal(model.alpha_per_target, alpha_ref.astype(np.float32))
    np.testing.assert_allclose(model.coef, coef_ref, atol=1e-5)


def test_r2_of_a_target_with_small_variance_is_scale_free():
    """R^2 = 1 - SSE/SST for any SST > 0, also below 1 (a target in small units)."""
    X, Y = _data(100, 20, K=4, seed=12)
    Y[:, 0] *= 1e-3
    model = ridge.fit_ridge_cv(X, Y, ALPHAS, N_FOLDS, progress=False)
    _, _, r2_ref = _brute_force(X, Y, ALPHAS, ridge.make_folds(100, N_FOLDS))
    np.testing.assert_allclose(model.cv_score, r2_ref, atol=1e-4, rtol=1e-3)


def test_a_constant_target_scores_zero_not_nan():
    X, Y = _data(60, 10, K=3, seed=13)
    Y[:, 1] = 4.0
    model = ridge.fit_ridge_cv(X, Y, ALPHAS, N_FOLDS, progress=False)
    assert model.cv_score[1] == 0.0 and np.all(np.isfinite(model.cv_score))
    np.testing.assert_allclose(model.predict(X)[:, 1], 4.0, rtol=1e-6)


@pytest.mark.parametrize("n,V,K,n_folds,chunk", [(40, 1, 3, 5, 1000), (40, 6, 1, 5, 1000), (30, 6, 4, 2, 1000),
                                                 (5, 8, 2, 5, 1000), (40, 6, 5, 5, 1)],
                         ids=["one_voxel", "one_target", "two_folds", "leave_one_out", "chunk_of_one"])
def test_the_smallest_legal_inputs_fit(n, V, K, n_folds, chunk):
    X, Y = _data(n, V, K, seed=14)
    model = ridge.fit_ridge_cv(X, Y, ALPHAS, n_folds, target_chunk=chunk, progress=False)
    assert model.coef.shape == (V, K) and np.all(np.isfinite(model.coef)) and np.all(np.isfinite(model.cv_score))
    with np.errstate(divide="ignore", invalid="ignore"):  # leave-one-out: the reference's R^2 divides by 0
        alpha_ref, coef_ref, _ = _brute_force(X, Y, ALPHAS, ridge.make_folds(n, n_folds))
    np.testing.assert_array_equal(model.alpha_per_target, alpha_ref.astype(np.float32))
    np.testing.assert_allclose(model.coef, coef_ref, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"X": np.zeros((10, 0), np.float32)}, r"empty input: X \(10, 0\)"),
    ({"Y": np.zeros((10, 0), np.float32)}, r"empty input: X \(10, 3\), Y \(10, 0\)"),
    ({"alphas": [1.0, np.inf]}, "positive finite numbers"),
    ({"alphas": [1.0, -1.0]}, "positive finite numbers"),
    ({"n_folds": 2.5}, "n_folds must be an integer >= 2, got 2.5"),
    ({"n_folds": 1}, "n_folds must be an integer >= 2, got 1"),
    ({"target_chunk": 2.5}, "target_chunk must be a positive integer, got 2.5"),
    ({"target_chunk": 0}, "target_chunk must be a positive integer, got 0"),
    ({"groups": np.arange(10).astype(np.float64)}, r"groups must be an integer array of shape \(10,\), got float64"),
])
def test_each_validation_condition_alone_is_refused(kwargs, match):
    X, Y = _data(10, 3, K=2, seed=15)
    args = {"X": X, "Y": Y, "alphas": ALPHAS, "n_folds": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        ridge.fit_ridge_cv(**args)


def test_groups_go_largest_first_to_the_least_loaded_fold():
    """GroupKFold's rule: sizes 5, 4, 3, 2, 1 into 2 folds give loads 8 / 7, the largest group first."""
    groups = np.repeat(np.arange(5), [1, 2, 3, 4, 5])
    folds = ridge.make_folds(len(groups), 2, groups)
    by_group = [int(folds[groups == g][0]) for g in range(5)]
    assert by_group == [0, 0, 1, 1, 0]
    assert np.bincount(folds).tolist() == [8, 7]
    # exactly as many groups as folds is enough
    np.testing.assert_array_equal(ridge.make_folds(5, 5, np.arange(5)), np.arange(5))
    # equal sizes: the lower group label first
    assert ridge.make_folds(4, 2, np.array([7, 3, 7, 3])).tolist() == [1, 0, 1, 0]
