import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from brainldm.train.data import nsd
from brainldm.train.config import from_dict
from brainldm.train.data.prepare import DatasetConfig
from tests.train.fixtures import (
    NSD_GRID, NSD_ROI_COORDS, build_nsd, write_hdf5_session, write_nifti_session, write_nsd_roi,
)

ROIS = {
    "V1": {"atlas": "prf-visualrois", "labels": ["V1v", "V1d"]},
    "V2": {"atlas": "prf-visualrois", "labels": [3, 4]},
    "hV4": {"atlas": "prf-visualrois", "labels": ["hV4"]},
}


def config(root, **kw) -> DatasetConfig:
    return from_dict(DatasetConfig, {"source": "nsd", "root": str(root), "subject": 1, "rois": ROIS,
                                     "betas_format": "hdf5", **kw})


def flat(coords):
    return sorted(np.ravel_multi_index(tuple(np.array(coords).T), NSD_GRID).tolist())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return build_nsd(tmp_path_factory.mktemp("nsd"), fmt="both")


def test_trial_image_ids_one_based_mapping():
    design = nsd.ExpDesign(
        masterordering=np.array([3, 1, 2, 3, 2]), subjectim=np.array([[10, 20, 30], [5, 6, 7]]),
        sharedix=np.array([20]), path=Path("x.mat"),
    )
    assert nsd.trial_image_ids(design, 1, 4).tolist() == [29, 9, 19, 29]
    assert nsd.trial_image_ids(design, 2, 5).tolist() == [6, 4, 5, 6, 5]
    with pytest.raises(ValueError, match="masterordering lists only 5"):
        nsd.trial_image_ids(design, 1, 6)


def test_load_maps_trials_images_and_test_set(both):
    raw = nsd.load(config(both.root))
    assert raw.image_ids[raw.trial_image].tolist() == both.trial_ids.tolist()
    assert raw.trial_session.tolist() == [1] * 8 + [2] * 8 + [3] * 8
    assert raw.image_ids[raw.image_is_test].tolist() == sorted(both.shared.tolist())
    np.testing.assert_array_equal(raw.images, both.images[raw.image_ids])
    assert raw.captions == [both.captions[int(i)] for i in raw.image_ids]
    assert raw.image_names[0] == f"nsd-{raw.image_ids[0]}"


def test_hdf5_and_nifti_identical_and_scaled(both):
    raw_h = nsd.load(config(both.root, betas_format="hdf5"))
    raw_n = nsd.load(config(both.root, betas_format="nifti"))
    np.testing.assert_array_equal(raw_h.betas, raw_n.betas)
    x, y, z = np.unravel_index(raw_h.voxel_ids, NSD_GRID)
    np.testing.assert_array_equal(raw_h.betas, both.betas[:, x, y, z].astype(np.float32) / np.float32(300))
    expected_v1 = flat(NSD_ROI_COORDS[1] + NSD_ROI_COORDS[2])
    assert raw_h.voxel_ids[raw_h.roi_columns["V1"]].tolist() == expected_v1
    assert raw_h.voxel_ids[raw_h.roi_columns["V2"]].tolist() == flat(NSD_ROI_COORDS[3] + NSD_ROI_COORDS[4])


@pytest.mark.parametrize("fmt", ["hdf5", "nifti"])
def test_transpose_with_known_values_at_asymmetric_coordinates(tmp_path, fmt):
    build_nsd(tmp_path, fmt=fmt, n_sessions=1, per_session=12)
    betas = np.full((12,) + NSD_GRID, 999, np.int16)  # a wrongly indexed read sees 999 / 300
    betas[:, 0, 0, 0] = 300  # V1v voxel (0, 0, 0): 1.0
    betas[:, 4, 1, 2] = -600  # V1v voxel (4, 1, 2): -2.0
    betas[:, 1, 3, 0] = 0
    betas[5, 1, 3, 0] = 150  # V1d voxel (1, 3, 0) on trial 5 only: 0.5
    (write_hdf5_session if fmt == "hdf5" else write_nifti_session)(tmp_path, 1, 1, betas)
    raw = nsd.load(config(tmp_path, betas_format=fmt, rois={"V1": ROIS["V1"]}))
    coords = np.array(np.unravel_index(raw.voxel_ids, NSD_GRID)).T
    values = {tuple(int(v) for v in c): raw.betas[:, k] for k, c in enumerate(coords)}
    assert sorted(values) == [(0, 0, 0), (1, 3, 0), (4, 1, 2)]
    assert values[(0, 0, 0)].tolist() == [1.0] * 12
    assert values[(4, 1, 2)].tolist() == [-2.0] * 12
    assert values[(1, 3, 0)].tolist() == [0.0] * 5 + [0.5] + [0.0] * 6


def test_roi_labels_by_name_equal_by_integer(both):
    by_name = nsd.roi_voxel_ids(both.root, 1, "prf-visualrois", ["V2v", "hV4"])[0]
    by_int = nsd.roi_voxel_ids(both.root, 1, "prf-visualrois", [3, 7])[0]
    assert by_name.tolist() == by_int.tolist() == flat(NSD_ROI_COORDS[3] + NSD_ROI_COORDS[7])
    with pytest.raises(ValueError, match=r"prf-visualrois\.mgz\.ctab.*'V9'"):
        nsd.roi_voxel_ids(both.root, 1, "prf-visualrois", ["V9"])
    with pytest.raises(ValueError, match="zero voxels"):
        nsd.roi_voxel_ids(both.root, 1, "prf-visualrois", [12])


def test_image_resize_lanczos(both):
    raw = nsd.load(config(both.root, image_size=4, sessions=1))
    expected = np.asarray(Image.fromarray(both.images[raw.image_ids[0]]).resize((4, 4), Image.LANCZOS))
    assert raw.images.shape[1:] == (4, 4, 3)
    np.testing.assert_array_equal(raw.images[0], expected)


def test_sessions_count_and_beyond_present(both):
    raw = nsd.load(config(both.root, sessions=2))
    assert raw.betas.shape[0] == 16 and raw.trial_session.max() == 2
    with pytest.raises(FileNotFoundError, match=r"betas_session04\.hdf5.*betas_session05\.hdf5"):
        nsd.load(config(both.root, sessions=5))


def test_grid_mismatch_is_an_error(tmp_path):
    build_nsd(tmp_path)
    write_hdf5_session(tmp_path, 1, 2, np.zeros((8, 5, 4, 4), np.int16))
    with pytest.raises(ValueError, match=r"betas_session02\.hdf5.*does not match the ROI grid \(5, 4, 3\)"):
        nsd.load(config(tmp_path))


def test_roi_grids_must_agree(tmp_path):
    build_nsd(tmp_path)
    write_nsd_roi(tmp_path, 1, "streams", np.ones((5, 4, 4), np.int16), {1: "early"})
    rois = {"V1": ROIS["V1"], "early": {"atlas": "streams", "labels": ["early"]}}
    with pytest.raises(ValueError, match="grid"):
        nsd.load(config(tmp_path, rois=rois))


def test_nan_betas_are_an_error(tmp_path):
    fx = build_nsd(tmp_path, fmt="nifti")
    bad = fx.betas[:8].astype(np.float32)
    bad[3, 0, 0, 0] = np.nan
    write_nifti_session(tmp_path, 1, 1, bad)
    with pytest.raises(ValueError, match=r"betas_session01\.nii\.gz.*non-finite"):
        nsd.load(config(tmp_path, betas_format="nifti"))


def test_duplicate_subjectim_ids_are_an_error(tmp_path):
    build_nsd(tmp_path)
    path = tmp_path / nsd.EXPDESIGN
    mat = scipy.io.loadmat(path)
    mat["subjectim"][0, 1] = mat["subjectim"][0, 0]
    scipy.io.savemat(path, {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(ValueError, match=r"nsd_expdesign\.mat.*subjectim row 1.*duplicates"):
        nsd.load(config(tmp_path))


def test_responses_mismatch_is_an_error(tmp_path):
    build_nsd(tmp_path)
    path = tmp_path / nsd.RESPONSES.format(subj="subj01")
    table = pd.read_csv(path, sep="\t")
    table.loc[(table.SESSION == 2) & (table.RUN == 1) & (table.TRIAL == 2), "73KID"] = 99999
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"responses\.tsv: session 2 trial 2 shows 73KID 99999"):
        nsd.load(config(tmp_path))


def test_missing_caption_is_an_error(tmp_path):
    fx = build_nsd(tmp_path)
    shown = int(fx.trial_ids[0])
    split = "train2017" if shown % 2 == 0 else "val2017"
    path = tmp_path / nsd.CAPTIONS.format(split=split)
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 500000 + 7 * shown]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"captions_{split}\.json: no caption for cocoId {500000 + 7 * shown}"):
        nsd.load(config(tmp_path))


@pytest.mark.parametrize("victim", [nsd.EXPDESIGN, nsd.STIMULI, nsd.ROI_FILE.format(subj="subj01", atlas="prf-visualrois")])
def test_missing_files_are_named(tmp_path, victim):
    build_nsd(tmp_path)
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=Path(victim).name.replace(".", r"\.")):
        nsd.load(config(tmp_path))


def test_imgbrick_wrong_shape_is_an_error(tmp_path):
    build_nsd(tmp_path)
    with h5py.File(tmp_path / nsd.STIMULI, "w") as f:
        f["imgBrick"] = np.zeros((24, 6, 5), np.uint8)
    with pytest.raises(ValueError, match=r"nsd_stimuli\.hdf5.*\(N, H, W, 3\)"):
        nsd.load(config(tmp_path))


def test_all_sessions_with_a_gap_is_an_error(tmp_path):
    build_nsd(tmp_path, n_sessions=3)
    (Path(tmp_path) / nsd.BETAS_DIR.format(subj="subj01") / "betas_session02.hdf5").unlink()
    with pytest.raises(FileNotFoundError, match=r"betas_session02\.hdf5.*present: \[1, 3\]"):
        nsd.load(config(tmp_path))


def test_select_test_images_by_minimum_repeats():
    # images 7 (shared, 3x), 8 (shared, 1x), 9 (not shared, 1x), 4 (shared, 2x)
    trials = np.array([7, 8, 7, 9, 4, 7, 4])
    shared = np.array([4, 7, 8])
    kept, images = nsd.select_test_images(trials, shared, None)
    assert kept.all() and images.tolist() == [4, 7, 8, 9]
    kept, images = nsd.select_test_images(trials, shared, 2)
    assert trials[kept].tolist() == [7, 7, 9, 4, 7, 4] and images.tolist() == [4, 7, 9]
    kept, images = nsd.select_test_images(trials, shared, 3)
    assert trials[kept].tolist() == [7, 7, 9, 7] and images.tolist() == [7, 9]  # 9 stays: a training image
    with pytest.raises(ValueError, match=r"test_min_repeats 4: no shared image is shown that often .*most: 3"):
        nsd.select_test_images(trials, shared, 4)


def test_load_drops_shared_images_below_the_minimum(tmp_path):
    fx = build_nsd(tmp_path, per_session=7)  # 21 trials over 12 images: some shown twice, some once
    ids, repeats = np.unique(fx.trial_ids, return_counts=True)
    rare = set(ids[np.isin(ids, fx.shared) & (repeats < 2)].tolist())
    assert rare, "the fixture must show a shared image only once for this test to mean anything"
    raw = nsd.load(config(tmp_path, test_min_repeats=2))
    assert not rare & set(raw.image_ids.tolist())
    assert raw.image_ids[raw.trial_image].tolist() == [t for t in fx.trial_ids.tolist() if t not in rare]
    assert len(raw.betas) == len(raw.trial_session) == len(raw.trial_image)
    assert raw.image_ids[raw.image_is_test].tolist() == sorted(set(fx.shared.tolist()) - rare)
    everything = nsd.load(config(tmp_path))
    assert everything.image_is_test.sum() == len(fx.shared)
    kept = ~np.isin(fx.trial_ids, list(rare))
    np.testing.assert_array_equal(raw.betas, everything.betas[kept])
    np.testing.assert_array_equal(raw.trial_session, everything.trial_session[kept])


def test_test_min_repeats_is_nsd_only_and_positive(tmp_path):
    from brainldm.train.data.prepare import load_raw
    with pytest.raises(ValueError, match=r"test_min_repeats 0 for a nsd dataset; expected a positive count"):
        load_raw(config(tmp_path, test_min_repeats=0))
    with pytest.raises(ValueError, match=r"test_min_repeats 3 for a things dataset"):
        load_raw(from_dict(DatasetConfig, {"source": "things", "root": str(tmp_path), "subject": 1,
                                           "rois": {"V1": {"columns": ["V1"]}}, "test_min_repeats": 3}))
