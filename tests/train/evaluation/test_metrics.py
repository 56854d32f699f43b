"""Metrics against hand-computed values on tiny arrays."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from brainldm.train.evaluation import metrics

SSIM_C1 = (0.01 * metrics.SSIM_DATA_RANGE) ** 2  # skimage's K1 = 0.01


def _flat_images(rgb_values, size=4) -> np.ndarray:
    """(N, size, size, 3) uint8 images, image n filled with the RGB triple rgb_values[n]."""
    values = np.asarray(rgb_values, dtype=np.uint8)
    return np.broadcast_to(values[:, None, None, :], (len(values), size, size, 3)).copy()


def test_pixcorr_hand_computed_flat_colour_images():
    """Flat images stay flat under bilinear resizing, so PixCorr is r between the RGB triples.

    gt (0, 100, 200) has deviations (-100, 0, 100): vs (0, 200, 100) with (-100, 100, 0):
    r = 10000 / 20000 = 0.5; vs (200, 100, 0): r = -1; vs (50, 150, 250): r = 1.
    """
    gt = _flat_images([(0, 100, 200)] * 3)
    pred = _flat_images([(0, 200, 100), (200, 100, 0), (50, 150, 250)])
    np.testing.assert_allclose(metrics.pixcorr(gt, pred), [0.5, -1.0, 1.0], atol=1e-6)


def test_pixcorr_is_one_for_affine_copies_at_any_size():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    affine = 0.5 * gt.astype(np.float64) / 255.0 + 0.25
    np.testing.assert_allclose(metrics.pixcorr(gt, affine), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(metrics.pixcorr(gt, 1.0 - gt / 255.0), [-1.0, -1.0], atol=1e-6)
    # a 64 px reconstruction of another image: PixCorr is low, not 1
    other = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    assert np.all(np.abs(metrics.pixcorr(gt, other)) < 0.1)


def test_ssim_hand_computed_constant_grey_images():
    """Constant grey images: sigma = 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), C1 = (0.01 * 1)^2.

    rgb2gray weights sum to 1, so a grey pixel v stays v. 51 / 255 = 0.2 and 153 / 255 = 0.6:
    (0.24 + 1e-4) / (0.40 + 1e-4) = 0.2401 / 0.4001.
    """
    gt = _flat_images([(51, 51, 51), (51, 51, 51)], size=8)
    pred = _flat_images([(153, 153, 153), (51, 51, 51)], size=8)
    np.testing.assert_allclose(metrics.ssim(gt, pred), [0.2401 / 0.4001, 1.0], atol=1e-6)
    assert SSIM_C1 == pytest.approx(1e-4)


def test_ssim_uses_population_covariance_and_gaussian_window():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 256, size=(1, 425, 425, 3), dtype=np.uint8)
    pred = np.clip(gt.astype(int) + rng.integers(-40, 41, size=gt.shape), 0, 255).astype(np.uint8)
    got = metrics.ssim(gt, pred)[0]
    g = metrics.prepare_images(metrics.prepare_images(gt), metrics.METRIC_SIZE)[0]
    p = metrics.prepare_images(metrics.prepare_images(pred), metrics.METRIC_SIZE)[0]
    from skimage.color import rgb2gray

    expected = structural_similarity(rgb2gray(g), rgb2gray(p), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
    sample_cov = structural_similarity(rgb2gray(g), rgb2gray(p), gaussian_weights=True, sigma=1.5,
                                       data_range=1.0)
    assert got == pytest.approx(expected, abs=1e-12)
    assert abs(got - sample_cov) > 1e-6  # the flags matter, so the test pins them


def test_prepare_images_resize_protocol():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(1, 256, 256, 3), dtype=np.uint8)
    # at the reference size: no resampling, only the exact /255 conversion
    np.testing.assert_array_equal(metrics.prepare_images(image), image.astype(np.float32) / np.float32(255))
    # a 512 px reconstruction is brought to 256 px once; its mean intensity is preserved
    big = np.repeat(np.repeat(image, 2, axis=1), 2, axis=2)
    down = metrics.prepare_images(big)
    assert down.shape == (1, 256, 256, 3) and down.dtype == np.float32
    assert down.mean() == pytest.approx(image.mean() / 255.0, abs=1e-3)
    assert metrics.prepare_images(image, size=425).shape == (1, 425, 425, 3)
    # a flat image stays exactly flat through 256 -> 425 (no uint8 re-quantisation)
    flat = metrics.prepare_images(_flat_images([(10, 20, 30)], size=256), size=425)
    np.testing.assert_allclose(flat[0, :, :, 1], 20 / 255, atol=1e-7)


def test_image_validation_errors():
    gt = _flat_images([(0, 100, 200)] * 2)
    with pytest.raises(ValueError, match="2 ground-truth images but 3 reconstructions"):
        metrics.pixcorr(gt, _flat_images([(0, 1, 2)] * 3))
    with pytest.raises(ValueError, match="different shapes"):
        metrics.prepare_images([np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="expected square"):
        metrics.ssim(np.zeros((1, 4, 6, 3), np.uint8), np.zeros((1, 4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.pixcorr(gt, gt.astype(np.float32))  # float images in 0..255
    with pytest.raises(ValueError, match="RGB"):
        metrics.prepare_images(np.zeros((2, 4, 4), np.uint8))
    # a list of equally sized images is fine
    assert metrics.prepare_images(list(gt), size=4).shape == (2, 4, 4, 3)


# Feature rows that are permutations of (1, 2, 3); by hand, r((1,2,3),(1,3,2)) = 0.5,
# r((1,2,3),(3,2,1)) = -1, r((1,3,2),(3,2,1)) = -0.5.
A, B, C = (1.0, 2.0, 3.0), (1.0, 3.0, 2.0), (3.0, 2.0, 1.0)


def test_cross_correlation_hand_computed():
    r = metrics.cross_correlation(np.array([A, B, C]), np.array([A, B, C]))
    np.testing.assert_allclose(r, [[1, 0.5, -1], [0.5, 1, -0.5], [-1, -0.5, 1]], atol=1e-12)


def test_identification_from_constructed_matrix_with_ties():
    """Column j is prediction j. Col 0: 0.1 < 0.9 wins, 0.9 ties -> (1 + 0.5) / 2 = 0.75.
    Col 1: 0.2 < 0.5 wins, 0.6 loses -> 0.5. Col 2: 0.9 loses, 0.3 < 0.4 wins -> 0.5."""
    r = np.array([[0.9, 0.2, 0.9],
                  [0.1, 0.5, 0.3],
                  [0.9, 0.6, 0.4]])
    np.testing.assert_allclose(metrics.identification_from_correlations(r), [0.75, 0.5, 0.5])


def test_two_way_identification_hand_computed():
    # pred 0 = B: r with real (A, B, C) = (0.5, 1, -0.5); congruent 0.5 beats only C -> 0.5
    # pred 1 = B: congruent r(B, B) = 1 beats 0.5 and -0.5 -> 1; pred 2 = C: 1 beats -1, -0.5 -> 1
    got = metrics.two_way_identification(np.array([A, B, C]), np.array([B, B, C]))
    np.testing.assert_allclose(got, [0.5, 1.0, 1.0])
    assert got.mean() == pytest.approx(2.5 / 3)


def test_two_way_identification_ties_from_duplicate_ground_truths():
    # real rows 0 and 1 identical, so for predictions 0 and 1 the other is an exact tie (0.5).
    # pred 0 = B: r(A, B) = 0.5 tie with row 1, beats r(C, B) = -0.5 -> 0.75
    # pred 1 = A: r(A, A) = 1 tie with row 0, beats r(C, A) = -1 -> 0.75; pred 2 = C -> 1
    got = metrics.two_way_identification(np.array([A, A, C]), np.array([B, A, C]))
    np.testing.assert_allclose(got, [0.75, 0.75, 1.0])


def test_identification_chance_level_and_errors():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((200, 50))
    assert metrics.two_way_identification(real, rng.standard_normal((200, 50))).mean() == pytest.approx(0.5, abs=0.03)
    assert metrics.two_way_identification(real, real + 0.1 * rng.standard_normal((200, 50))).mean() == 1.0
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.two_way_identification(real[:1], real[:1])
    with pytest.raises(ValueError, match="equal"):
        metrics.two_way_identification(real, real[:10])
    with pytest.raises(ValueError, match="constant"):
        metrics.two_way_identification(np.ones((3, 4)), real[:3, :4])


def test_feature_statistics_hand_computed():
    real = np.array([A, B])
    pred = np.array([B, C])
    np.testing.assert_allclose(metrics.per_sample_pearson(real, pred), [0.5, -0.5])
    np.testing.assert_allclose(metrics.correlation_distance(real, pred), [0.5, 1.5])
    # squared differences: (0, 1, 1) -> 2/3; (4, 1, 1) -> 2
    np.testing.assert_allclose(metrics.mse(real, pred), [2 / 3, 2.0])
    # feature 0 over samples: real (1, 1, 3), pred (1, 3, 1); deviations (-2, -2, 4) / 3 and
    # (-2, 4, -2) / 3: sum of products -12/9, sums of squares 24/9 each -> r = -0.5; features 1
    # and 2 likewise: (2, 3, 2) vs (3, 2, 2) and (3, 2, 1) vs (2, 1, 3) both give -0.5
    per_dim = metrics.per_dimension_pearson(np.array([A, B, C]), np.array([B, C, A]))
    np.testing.assert_allclose(per_dim, [-0.5, -0.5, -0.5])


def test_bootstrap_ci_and_summary():
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    low, high = metrics.bootstrap_ci(values, n_boot=2000, seed=0)
    assert low < values.mean() < high
    assert (low, high) == metrics.bootstrap_ci(values, n_boot=2000, seed=0)  # seeded
    # the bootstrap 95% CI of a mean is ~ mean +- 1.96 * population sd / sqrt(N) = 2 +- 1.24
    assert low == pytest.approx(2 - 1.96 * np.sqrt(2 / 5), abs=0.25)
    assert high == pytest.approx(2 + 1.96 * np.sqrt(2 / 5), abs=0.25)
    assert metrics.bootstrap_ci(np.full(7, 0.3)) == pytest.approx((0.3, 0.3))
    summary = metrics.summarise(values, n_boot=2000)
    # sem = sd(ddof=1) / sqrt(N) = sqrt(2.5) / sqrt(5) = sqrt(0.5)
    assert (summary.mean, summary.n) == (2.0, 5)
    assert summary.sem == pytest.approx(np.sqrt(0.5))
    assert (summary.ci_low, summary.ci_high) == (low, high)
    assert dataclasses.asdict(summary)["level"] == 0.95
    with pytest.raises(ValueError, match="non-finite"):
        metrics.summarise(np.array([0.1, np.nan]))


# Large-sample check of the percentile bootstrap against the normal interval mean +- z * sd / sqrt(N).
CI_SAMPLE_SIZE = 400
CI_BOOT = 20_000  # Monte Carlo error of each end ~0.02 standard errors
Z_95, Z_90 = 1.959964, 1.644854
CI_HALF_WIDTH_RTOL = 0.06  # a 90% interval is 16% narrower than the 95% one


def _normal_half_width(values: np.ndarray, z: float) -> float:
    """z x the plug-in standard error of the mean (population sd, as the bootstrap resamples)."""
    return z * values.std() / np.sqrt(len(values))


@pytest.mark.parametrize("level, z", [(0.95, Z_95), (0.90, Z_90)])
def test_bootstrap_ci_matches_the_normal_interval_on_a_large_sample(level, z):
    """N = 400 normal scores: the CI is mean +- z sd / sqrt(N) within 6%, so 90% cannot pass for 95%."""
    values = np.random.default_rng(1).normal(0.3, 0.1, CI_SAMPLE_SIZE)
    low, high = metrics.bootstrap_ci(values, n_boot=CI_BOOT, level=level, seed=0)
    expected = _normal_half_width(values, z)
    assert (high - low) / 2 == pytest.approx(expected, rel=CI_HALF_WIDTH_RTOL)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=CI_HALF_WIDTH_RTOL * expected)


def test_default_level_is_95_percent():
    values = np.random.default_rng(2).normal(0.0, 1.0, CI_SAMPLE_SIZE)
    summary = metrics.summarise(values, n_boot=CI_BOOT)
    assert summary.level == 0.95
    assert (summary.ci_high - summary.ci_low) / 2 == pytest.approx(_normal_half_width(values, Z_95),
                                                                   rel=CI_HALF_WIDTH_RTOL)
