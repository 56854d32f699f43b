"""The metrics' input contracts, message by message and boundary by boundary: written against
the survivors of the mutation run (docs/mutation.md), so that a check loosened, a boundary
moved or a message emptied fails a test."""
import re

import numpy as np
import pytest

from brainldm.train.evaluation import metrics as m

RNG = np.random.default_rng(0)
FEATURES = RNG.standard_normal((6, 5))
IMAGES = RNG.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("function", [m.per_sample_pearson, m.per_dimension_pearson, m.mse, m.cross_correlation])
def test_feature_metrics_name_themselves_in_every_error(function):
    name = function.__name__
    with pytest.raises(ValueError, match=rf"^{name}: features contain NaN or inf$"):
        function(FEATURES, np.where(np.eye(6, 5, dtype=bool), np.nan, FEATURES))  # only pred is bad
    with pytest.raises(ValueError, match=rf"^{name}: "):
        function(np.empty((0, 5)), np.empty((0, 5)))
    assert function(FEATURES[:1], FEATURES[:1] + 1).shape[0] >= 1  # one row is a valid input


def test_per_sample_pearson_is_per_row():
    pred = FEATURES.copy()
    pred[2] = -pred[2]
    r = m.per_sample_pearson(FEATURES, pred)
    np.testing.assert_allclose(r, [1, 1, -1, 1, 1, 1], atol=1e-12)


@pytest.mark.parametrize("function", [m.pixcorr, m.ssim])
def test_image_metrics_name_the_argument_at_fault(function):
    desc = function.__name__
    with pytest.raises(ValueError, match=rf"^{desc}: pred: float images must lie in \[0, 1\] without NaN$"):
        function(IMAGES, np.clip(IMAGES * 1.5, 0, 1.5))  # within [0, 2): a loosened bound passes it
    with pytest.raises(ValueError, match=rf"^{desc}: gt: images are 8x6; expected square images$"):
        function(IMAGES[:, :, :6], IMAGES)
    with pytest.raises(ValueError, match=rf"^{desc}: "
                                         "3 ground-truth images but 2 reconstructions; expected one reconstruction "
                                         "per ground-truth image$"):
        function(IMAGES, IMAGES[:2])


@pytest.mark.parametrize("images, message", [
    ([], r"shape \(0, 0, 0, 3\); expected \(N, H, W, 3\) RGB images with N >= 1"),
    (np.zeros((2, 4, 4, 1), np.float32), r"shape \(2, 4, 4, 1\)"),      # one bad condition alone
    (np.zeros((4, 4, 3), np.float32), r"shape \(4, 4, 3\)"),
    (np.zeros((2, 4, 4, 3), np.int32), "dtype int32; expected uint8 or float in \\[0, 1\\]"),
    ([np.zeros((4, 4, 3)), np.zeros((5, 5, 3))], "images have different shapes .* expected one \\(H, W, 3\\) shape for all images"),
])
def test_prepare_images_refuses_each_bad_batch(images, message):
    with pytest.raises(ValueError, match=rf"^prepare_images: {message}"):
        m.prepare_images(images)


def test_prepare_images_keeps_float32_and_the_reference_size():
    out = m.prepare_images(list(IMAGES), size=8)
    assert out.dtype == np.float32 and out.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out, IMAGES)  # at its own size an image is not resampled


def test_identification_refuses_all_but_square_matrices_of_two_or_more():
    for bad in (np.eye(1), np.ones((2, 3)), np.ones((3, 2)), np.ones(4)):
        with pytest.raises(ValueError, match=r"^identification: correlation matrix shape"):
            m.identification_from_correlations(bad)
    with pytest.raises(ValueError, match=r"^identification: correlations contain NaN or inf \(a constant feature "
                                         r"vector\?\)$"):
        m.identification_from_correlations(np.array([[1.0, np.nan], [0.0, 1.0]]))
    assert m.identification_from_correlations(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == [1.0, 1.0]


def test_identification_ties_count_half_and_equal_is_not_a_win():
    r = np.array([[0.5, 0.2, 0.9],
                  [0.5, 0.4, 0.1],    # r[1, 0] == r[0, 0]: a tie for prediction 0
                  [0.1, 0.4 + 1e-13, 0.3]])  # within TIE_ATOL of r[1, 1]: a tie for prediction 1
    np.testing.assert_array_equal(m.identification_from_correlations(r), [0.75, 0.75, 0.5])


def test_bootstrap_ci_arguments_at_their_boundaries():
    values = RNG.uniform(0, 1, 20)
    assert m.bootstrap_ci(values, n_boot=1, level=0.5)  # the smallest valid choices
    for n_boot, level in [(0, 0.95), (1, 0.0), (1, 1.0), (10, 1.5), (0, 0.5)]:
        with pytest.raises(ValueError, match=rf"^bootstrap_ci: n_boot={n_boot}, level={re.escape(str(level))}; "
                                             r"expected n_boot >= 1, 0 < level < 1$"):
            m.bootstrap_ci(values, n_boot=n_boot, level=level)
    with pytest.raises(ValueError, match=r"^bootstrap_ci: values shape \(0,\); expected \(N,\) with N >= 1$"):
        m.bootstrap_ci([])
    with pytest.raises(ValueError, match=r"^bootstrap_ci: 2 non-finite values \(e.g. PixCorr of a constant image\); "
                                         r"expected finite per-image scores$"):
        m.bootstrap_ci([0.1, np.nan, np.inf])


def test_bootstrap_ci_is_the_seeded_percentile_interval():
    values = RNG.uniform(0, 1, 30)
    rng = np.random.default_rng(0)  # the default seed
    means = values[rng.integers(0, 30, size=(200, 30))].mean(axis=1)
    expected = np.percentile(means, [5.0, 95.0])
    assert m.bootstrap_ci(values, n_boot=200, level=0.9) == pytest.approx(tuple(expected), abs=0, rel=0)
    assert m.bootstrap_ci(values, n_boot=200, level=0.9, seed=1) != m.bootstrap_ci(values, n_boot=200, level=0.9)


def test_summarise_passes_its_settings_through():
    values = RNG.uniform(0, 1, 12)
    s = m.summarise(values, n_boot=50, level=0.8, seed=3)
    assert (s.ci_low, s.ci_high) == m.bootstrap_ci(values, n_boot=50, level=0.8, seed=3)
    assert s.level == 0.8 and s.n == 12
    assert s.sem == pytest.approx(values.std(ddof=1) / np.sqrt(12), rel=1e-12)
    assert m.summarise(values) == m.summarise(values, seed=0)  # default seed 0, as bootstrap_ci's
    two = m.summarise(np.array([0.2, 0.4]))
    assert two.sem == pytest.approx(0.1, rel=1e-12)  # N = 2 has a standard error
    assert m.summarise(np.array([0.3])).sem == 0.0
    with pytest.raises(ValueError, match=r"^summarise: values shape \(2, 2\)"):
        m.summarise(np.ones((2, 2)))


def test_an_empty_array_batch_is_refused_like_an_empty_list():
    with pytest.raises(ValueError, match=r"^prepare_images: shape \(0, 4, 4, 3\); expected"):
        m.prepare_images(np.zeros((0, 4, 4, 3), np.float32))


def test_float32_inputs_are_computed_in_float64():
    real32, pred32 = FEATURES.astype(np.float32), (FEATURES[::-1] + 0.3).astype(np.float32)
    for function in (m.per_sample_pearson, m.per_dimension_pearson, m.mse):
        np.testing.assert_array_equal(function(real32, pred32), function(real32.astype(np.float64), pred32))
        np.testing.assert_array_equal(function(real32, pred32), function(real32, pred32.astype(np.float64)))
    scores = RNG.uniform(0, 1, 9).astype(np.float32)
    assert m.summarise(scores) == m.summarise(scores.astype(np.float64))


def test_a_constant_row_gives_nan_without_a_warning():
    import warnings

    real = FEATURES.copy()
    real[1] = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's 0/0 warning would raise here
        r = m.per_sample_pearson(real, FEATURES)
    assert np.isnan(r[1]) and np.isfinite(np.delete(r, 1)).all()


def test_a_difference_of_exactly_the_tie_tolerance_is_a_tie():
    r = np.array([[0.0, 0.0], [m.TIE_ATOL, 1.0]])  # column 0: r[1, 0] - r[0, 0] == TIE_ATOL exactly
    assert m.identification_from_correlations(r)[0] == 0.5
