import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainldm.train.data import things
from brainldm.train.config import from_dict
from brainldm.train.data.prepare import DatasetConfig
from tests.train.fixtures import THINGS_TEST, build_things, write_things_responses

ROIS = {"V1": {"columns": ["V1"]}, "FFA": {"columns": ["lFFA", "rFFA"]}, "PPA": {"columns": ["lPPA", "rPPA"]}}
SIZE = 8


def config(root, **kw) -> DatasetConfig:
    base = {"source": "things", "root": str(root), "subject": 1, "rois": ROIS, "image_size": SIZE}
    return from_dict(DatasetConfig, {**base, **kw})


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_things(tmp_path_factory.mktemp("things"))


def test_roi_columns_union(fx):
    raw = things.load(config(fx.root))
    ids = fx.voxel_ids
    assert raw.voxel_ids[raw.roi_columns["V1"]].tolist() == ids[[0, 1]].tolist()
    assert raw.voxel_ids[raw.roi_columns["FFA"]].tolist() == ids[[6, 7, 8]].tolist()  # lFFA {6,7} | rFFA {7,8}
    assert raw.voxel_ids[raw.roi_columns["PPA"]].tolist() == ids[[9]].tolist()  # rPPA is empty


def test_responses_follow_voxel_ids_and_trials(fx):
    raw = things.load(config(fx.root))
    cols = np.searchsorted(fx.voxel_ids, raw.voxel_ids)
    np.testing.assert_array_equal(raw.betas, fx.betas[:, cols])
    names = np.array(raw.image_names)[raw.trial_image]
    assert names.tolist() == fx.table["stimulus"].tolist()
    assert raw.trial_session.tolist() == fx.table["session"].tolist()
    assert sorted(np.array(raw.image_names)[raw.image_is_test]) == sorted(THINGS_TEST)
    first = [int(fx.table.index[fx.table.stimulus == n][0]) for n in raw.image_names]
    assert raw.image_ids.tolist() == first


def test_captions_word_definition_and_fallback(fx):
    raw = things.load(config(fx.root))
    captions = dict(zip(raw.image_names, raw.captions))
    assert captions["dog_13s.jpg"] == ["dog: a domesticated canid"]
    assert captions["aardvark_02b.jpg"] == ["aardvark: nocturnal burrowing mammal"]
    assert captions["ice_cream_14s.jpg"] == ["ice cream"]
    assert things.concept_of("ice_cream_14s.jpg") == "ice_cream"


def test_images_resized_lanczos(fx):
    raw = things.load(config(fx.root))
    k = raw.image_names.index("bat_02b.jpg")
    with Image.open(fx.root / "object_images/bat/bat_02b.jpg") as img:
        expected = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS))
    assert raw.images.shape == (len(raw.image_names), SIZE, SIZE, 3)
    np.testing.assert_array_equal(raw.images[k], expected)


def test_sessions_subset_and_beyond_present(fx):
    raw = things.load(config(fx.root, sessions=2))
    assert raw.trial_session.tolist() == fx.table["session"].tolist()[:12]
    assert len(raw.image_names) == 8 + 2
    with pytest.raises(ValueError, match=r"StimulusMetadata\.csv: 4 sessions requested but only 3"):
        things.load(config(fx.root, sessions=4))


def _rewrite_table(root, table):
    table.to_csv(root / "betas_csv/sub-01_StimulusMetadata.csv", index=False)


def test_bad_roi_columns(tmp_path):
    build_things(tmp_path)
    with pytest.raises(ValueError, match=r"VoxelMetadata\.csv: ROI 'X' columns \['lEBA'\] missing"):
        things.load(config(tmp_path, rois={"X": {"columns": ["lEBA"]}}))
    with pytest.raises(ValueError, match=r"VoxelMetadata\.csv: ROI 'R' .*zero voxels"):
        things.load(config(tmp_path, rois={"R": {"columns": ["rPPA"]}}))


def test_duplicate_trial_rows(tmp_path):
    fx = build_things(tmp_path)
    table = pd.concat([fx.table, fx.table.iloc[[3]]], ignore_index=True)
    _rewrite_table(tmp_path, table)
    with pytest.raises(ValueError, match=r"StimulusMetadata\.csv: duplicated trial"):
        things.load(config(tmp_path))


def test_stimulus_both_train_and_test(tmp_path):
    fx = build_things(tmp_path)
    table = fx.table.copy()
    row = int(np.flatnonzero(table.trial_type == "train")[0])
    table.loc[row, "stimulus"] = THINGS_TEST[0]
    _rewrite_table(tmp_path, table)
    with pytest.raises(ValueError, match="both train and test"):
        things.load(config(tmp_path))


def test_trial_columns_must_match_stimulus_rows(tmp_path):
    fx = build_things(tmp_path)
    write_things_responses(tmp_path, 1, fx.voxel_ids, fx.betas[:-1])
    with pytest.raises(ValueError, match=r"ResponseData\.h5: 17 trial columns; expected columns 0\.\.17"):
        things.load(config(tmp_path))


def test_nan_betas_and_missing_voxels(tmp_path):
    fx = build_things(tmp_path)
    bad = fx.betas.copy()
    bad[2, 0] = np.nan
    write_things_responses(tmp_path, 1, fx.voxel_ids, bad)
    with pytest.raises(ValueError, match=r"ResponseData\.h5: 1 non-finite"):
        things.load(config(tmp_path))
    write_things_responses(tmp_path, 1, fx.voxel_ids[1:], fx.betas[:, 1:])
    with pytest.raises(ValueError, match=rf"ResponseData\.h5: ROI voxel ids \[{fx.voxel_ids[0]}\]"):
        things.load(config(tmp_path))


def test_missing_image_and_concepts(tmp_path):
    build_things(tmp_path)
    (tmp_path / "object_images/dog/dog_13s.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"dog_13s\.jpg"):
        things.load(config(tmp_path))
    build_things(tmp_path)
    (tmp_path / "things_concepts.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"things_concepts\.tsv"):
        things.load(config(tmp_path))


def test_images_of_different_sizes_need_image_size(tmp_path):
    build_things(tmp_path)
    with pytest.raises(ValueError, match="differ in size"):
        things.load(config(tmp_path, image_size=None))


@pytest.mark.parametrize("column", ["nc_testset", "nc_singletrial"])
def test_roi_by_noise_ceiling_is_refused(tmp_path, column):
    # nc_* come from the test images' repeats: selecting voxels by them leaks the test set.
    build_things(tmp_path)
    with pytest.raises(ValueError, match=rf"ROI 'R' uses \['{column}'\].*test set"):
        things.load(config(tmp_path, rois={"R": {"columns": ["V1", column]}}))
