"""The voxel encoding model: features, pRFs, layout, signal and trial noise."""
from __future__ import annotations

import numpy as np
import pytest

from brainldm.train.simulation import encoding, scenes
from brainldm.train.simulation.encoding import EncodingConfig

CONFIG = EncodingConfig(feature_grid=16)


def test_semantic_features_one_hot_blocks():
    _, _, labels, scene_list = scenes.generate(20, seed=1, size=16)
    code = encoding.semantic_features(scene_list)
    assert code.shape == (20, encoding.SEMANTIC_WIDTH) == (20, 21) and code.dtype == np.float32
    assert np.array_equal(code[:, :6].argmax(1), labels["kind"]) and np.all(code[:, :6].sum(1) == 1)
    assert np.all(code[:, 6:14].sum(1) >= 1) and np.all(code[np.arange(20), 6 + labels["colour"]] == 1)
    assert np.array_equal(code[:, 14:17].argmax(1) + 1, labels["count"])
    assert np.array_equal(code[:, 17:].argmax(1), labels["background"])


def test_image_features_colour_and_orientation():
    grey = np.full((1, 32, 32, 3), 128, np.uint8)
    features = encoding.image_features(grey, 16, 4)
    assert features.shape == (1, 8, 16, 16) and np.allclose(features[0, 1:], 0, atol=1e-6)
    assert np.isclose(features[0, 0].mean(), 128 / 255 - 0.5, atol=1e-6)
    edge = np.zeros((1, 32, 32, 3), np.uint8)
    edge[:, :, 16:] = 255  # a vertical edge: horizontal gradient, orientation channel 0
    energy = encoding.image_features(edge, 16, 4)[0, 4:].sum(axis=(1, 2))
    assert energy.argmax() == 0 and np.isclose(energy[2], 0) and np.isclose(energy[1], energy[3])
    red = np.zeros((1, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    assert encoding.image_features(red, 16, 4)[0, 1].min() > 0.99  # red-green channel
    with pytest.raises(ValueError, match="feature_grid"):
        encoding.image_features(grey, 12, 4)


def _voxels(seed: int, areas=("V1", "V2", "V3", "hV4", "high", "")) -> encoding.VoxelModel:
    area = np.repeat(np.array(areas), 60)
    rng = np.random.default_rng(seed)
    field_x = np.where(np.arange(len(area)) % 2, 1, -1)
    return encoding.build_voxels(area, field_x, np.zeros(len(area), int), CONFIG, rng)


def test_build_voxels_retinotopy_and_determinism():
    model, again = _voxels(0), _voxels(0)
    assert all(np.array_equal(getattr(model, f), getattr(again, f)) for f in ("prf_x", "colour_weights", "amplitude"))
    right = np.arange(len(model.area)) % 2 == 1
    assert np.all(model.prf_x[right] > 0.5) and np.all(model.prf_x[~right] < 0.5)
    sizes = [model.prf_sigma[model.area == a].mean() for a in ("V1", "V2", "V3", "hV4")]
    assert np.all(np.diff(sizes) > 0)  # pRFs grow up the hierarchy
    assert np.all(model.amplitude[model.area == ""] == 0) and np.all(model.amplitude[model.area != ""] > 0)
    weights = encoding.prf_weights(model, 16)
    assert weights.shape == (360, 256) and np.allclose(weights.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="area classes"):
        _voxels(0, areas=("V7",))


def test_signal_decodes_local_colour_and_semantics():
    images, _, labels, scene_list = scenes.generate(240, seed=5, size=32)
    model = _voxels(1)
    signal = encoding.voxel_signal(model, images, encoding.semantic_features(scene_list), CONFIG)
    roi = model.area != ""
    assert signal.shape == (240, 360) and np.all(signal[:, ~roi] == 0)
    assert np.allclose(signal[:, roi].mean(0), 0, atol=1e-4) and np.allclose(signal[:, roi].std(0), 1, atol=1e-3)
    rng = np.random.default_rng(2)
    trials = encoding.simulate_trials(model, signal, np.arange(240), np.arange(240) % 2, CONFIG, rng)
    lower = np.isin(model.area, ("V1", "V2", "V3", "hV4"))
    # Ridge from single noisy trials of lower areas to 4x4 block-mean colour, held-out correlation.
    target = images.reshape(240, 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(240, -1) / 255.0
    assert _ridge_r(trials[:, lower], target) > 0.6
    onehot = np.eye(6)[labels["kind"]]  # main shape kind from the higher area
    assert _ridge_r(trials[:, model.area == "high"], onehot) > _ridge_r(trials[:, lower], onehot)


def _ridge_r(x: np.ndarray, y: np.ndarray, alpha: float = 100.0) -> float:
    """Mean per-target Pearson r of a ridge fit on the first 200 rows, tested on the rest."""
    x = (x - x[:200].mean(0)) / x[:200].std(0)
    w = np.linalg.solve(x[:200].T @ x[:200] + alpha * np.eye(x.shape[1]), x[:200].T @ (y[:200] - y[:200].mean(0)))
    pred, true = x[200:] @ w, y[200:] - y[:200].mean(0)
    return float(np.nanmean([np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in range(y.shape[1])]))


def test_simulate_trials_noise_floor_and_drift():
    model = _voxels(3)
    signal = np.zeros((1, len(model.area)), np.float32)
    n = 4000
    trials = encoding.simulate_trials(model, signal, np.zeros(n, int), np.arange(n) % 2, CONFIG,
                                      np.random.default_rng(4))
    assert trials.dtype == np.float32 and trials.shape == (n, 360)
    within = trials[0::2].std(0)  # one session: gain * noise_sd
    assert 0.5 * CONFIG.noise_sd < np.median(within) < 2 * CONFIG.noise_sd
    session_shift = trials[0::2].mean(0) - trials[1::2].mean(0)
    assert np.std(session_shift) > 0.5 * CONFIG.session_offset_sd  # per-session drift is there


def test_brain_layout_places_rois_posterior_first():
    plan = [("V1", 40, "any", ""), ("hV4", 20, "ventral", ""), ("lFFA", 10, "ventral", "l"), ("far", 30, "any", "")]
    layout = encoding.brain_layout((10, 12, 10), plan, np.random.default_rng(0))
    counts = np.bincount(layout.roi[layout.roi > 0])
    assert list(counts[1:]) == [40, 20, 10, 30] and layout.roi.dtype == np.int16
    y = np.indices(layout.roi.shape)[1]
    assert y[layout.roi == 1].mean() < y[layout.roi == 4].mean()  # V1 posterior of later ROIs
    assert np.all(layout.left[layout.roi == 3]) and 0.3 < layout.left[layout.roi == 1].mean() < 0.7
    assert np.all(layout.direction[layout.roi == 2] == encoding.DIRECTIONS.index("ventral"))
    assert np.all(layout.inferior[layout.roi == 2])
    with pytest.raises(ValueError, match="too small"):
        encoding.brain_layout((6, 6, 6), [("V1", 500, "any", "")], np.random.default_rng(0))


def _linear_r2(drive: np.ndarray, response: np.ndarray) -> float:
    """Share of each column's variance a linear function of its drive explains, averaged."""
    return float(np.mean([np.corrcoef(d, r)[0, 1] ** 2 for d, r in zip(drive.T, response.T)]))


def test_nonlinear_response_is_standardised_and_its_knobs_control_linearity():
    drive = 3.0 + 2.0 * np.random.default_rng(0).standard_normal((20000, 4))
    near_linear = encoding.nonlinear_response(drive, 0.1)
    rectified = encoding.nonlinear_response(drive, 6.0)
    sparse = encoding.nonlinear_response(drive, 6.0, threshold=1.0)
    for response in (near_linear, rectified, sparse):
        np.testing.assert_allclose(response.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(response.std(axis=0), 1, atol=1e-9)
    # the drive's offset and scale do not matter: the drive is standardised first
    np.testing.assert_allclose(encoding.nonlinear_response(10 * drive - 7, 6.0), rectified, atol=1e-9)
    assert _linear_r2(drive, near_linear) > 0.995
    # rectification at the mean keeps most of the variance linear; above threshold much less
    assert 0.6 < _linear_r2(drive, rectified) < 0.85
    assert _linear_r2(drive, sparse) < 0.5
