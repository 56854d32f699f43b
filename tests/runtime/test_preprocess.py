from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from brainldm.runtime import preprocess as pp
from tests.export.tiny_bundle import N_VOXELS, ROIS, SESSIONS, TEST_IMAGES, write_prepared


@pytest.fixture
def prepared(tmp_path):
    path = tmp_path / "ds.h5"
    write_prepared(path)
    with h5py.File(path) as f:
        stats = SimpleNamespace(voxel_ids=f["norm/voxel_ids"][()], sessions=f["norm/sessions"][()],
                                mean=f["norm/mean"][()], std=f["norm/std"][()],
                                columns={"z": f["rois/A/columns"][()], "c": np.concatenate([f["rois/B/columns"][()],
                                                                                             f["rois/C/columns"][()]])})
        raw = {k: f[f"raw_test/{k}"][()] for k in ("betas", "session", "image_index")}
        test = {roi: f[f"splits/test/rois/{roi}"][()] for roi in ROIS}
    return stats, raw, test


def test_raw_trials_reproduce_the_prepared_test_split(prepared):
    stats, raw, test = prepared
    ids, x = pp.preprocess(raw["betas"], raw["session"], raw["image_index"], stats)
    assert ids.tolist() == list(TEST_IMAGES)  # items = sorted group ids, as the test split
    np.testing.assert_array_equal(x["z"], test["A"])
    np.testing.assert_array_equal(x["c"], np.concatenate([test["B"], test["C"]], axis=1))
    perm = np.random.default_rng(3).permutation(len(raw["betas"]))
    ids2, x2 = pp.preprocess(raw["betas"][perm], raw["session"][perm], raw["image_index"][perm], stats)
    assert ids2.tolist() == ids.tolist()
    np.testing.assert_allclose(x2["z"], x["z"], atol=1e-6)


def test_without_group_each_row_is_an_item(prepared):
    stats, raw, _ = prepared
    ids, x = pp.preprocess(raw["betas"][:3], raw["session"][:3], None, stats)
    assert ids.tolist() == [0, 1, 2]
    rows = np.searchsorted(SESSIONS, raw["session"][:3])
    expected = (raw["betas"][:3] - stats.mean[rows]) / stats.std[rows]
    np.testing.assert_array_equal(x["z"], expected[:, ROIS["A"]])


@pytest.mark.parametrize("mutate, message", [
    (lambda b, s, g: (b[:, :-1], s, g), r"shape \(8, 29\); expected \(n_trials, 30\)"),
    (lambda b, s, g: (b[:0], s[:0], g[:0]), "betas are empty"),
    (lambda b, s, g: (np.where(np.arange(N_VOXELS) == 4, np.nan, b), s, g), "8 NaN/Inf values"),
    (lambda b, s, g: (b, s + 10, g), r"unknown session\(s\) \[11, 13\]"),
    (lambda b, s, g: (b, s[:-1], g), r"session has shape \(7,\)"),
    (lambda b, s, g: (b, s, g[:-1]), r"group has shape \(7,\)"),
    (lambda b, s, g: (b, None, g), "session is required"),
])
def test_bad_input_is_refused(prepared, mutate, message):
    stats, raw, _ = prepared
    with pytest.raises(pp.InputError, match=message):
        pp.preprocess(*mutate(raw["betas"], raw["session"], raw["image_index"]), stats)


@pytest.mark.parametrize("size", [24, 11, 16])
def test_resize_matches_torch_bicubic(size):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=(size, size), mode="bicubic",
                                               align_corners=False).clamp(-1, 1).numpy()
    np.testing.assert_allclose(pp.resize_bicubic(images, size), expected, atol=2e-6)
