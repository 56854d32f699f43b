"""prepare's contracts at their edges, written against the mutants that survived test_prepare.py
(docs/mutation-survivors.tsv): the split boundaries, one training trial in a session, the session
label of averaged repeats, every validate_raw message in full, the file's attributes, the CLI."""
import re

import h5py
import numpy as np
import pytest

from brainldm.train.data import prepare as pp
from tests.train.data.test_prepare import nsd_fx, params, run  # noqa: F401  (nsd_fx: a fixture)


def _raw(**changes) -> pp.RawData:
    """4 images (the last one test), 8 trials in 2 sessions, 3 voxels in 2 ROIs."""
    rng = np.random.default_rng(0)
    raw = pp.RawData(
        source="nsd", subject="subj01", betas=rng.standard_normal((8, 3)).astype(np.float32),
        voxel_ids=np.arange(3), roi_columns={"V1": np.array([0, 1]), "higher": np.array([2])},
        trial_image=np.array([0, 1, 2, 3, 0, 1, 2, 3]), trial_session=np.array([1, 1, 1, 1, 2, 2, 2, 2]),
        image_ids=np.array([10, 11, 12, 13]), image_names=["a", "b", "c", "d"],
        image_is_test=np.array([False, False, False, True]), images=np.zeros((4, 2, 2, 3), np.uint8),
        captions=[["x"], ["y"], ["z"], ["w"]],
    )
    for key, value in changes.items():
        setattr(raw, key, value)
    return raw


def test_val_fraction_zero_is_allowed_and_one_is_not():
    is_test = np.array([False, False, False, True])
    val, train = pp.assign_images(is_test, 0.0, seed=0)
    assert val.tolist() == [] and train.tolist() == [0, 1, 2] and train.dtype == np.int64
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=re.escape(f"val_fraction {bad}; expected 0 <= val_fraction < 1")):
            pp.assign_images(is_test, bad, seed=0)


def test_one_training_image_left_is_enough_and_none_is_refused():
    is_test = np.array([False, False, True])
    val, train = pp.assign_images(is_test, 0.5, seed=0)  # round(0.5 * 2) = 1 of 2 candidates
    assert len(val) == 1 and len(train) == 1 and val.dtype == np.int64
    with pytest.raises(ValueError, match=re.escape("2 training images leave none for training after validation")):
        pp.assign_images(is_test, 0.8, seed=0)  # round(1.6) = 2 of 2


def test_a_session_with_one_training_trial_is_normalised_and_one_with_none_is_refused():
    betas = np.array([[1.0, 2.0], [3.0, 5.0], [7.0, 7.0]], np.float32)
    stats = pp.session_stats(betas, np.array([1, 1, 2]), np.array([0, 1, 2]))
    np.testing.assert_array_equal(stats.mean, [[2.0, 3.5], [7.0, 7.0]])
    np.testing.assert_array_equal(stats.std, [[1.0, 1.5], [1.0, 1.0]])  # one trial: std 0 -> 1
    assert stats.sessions.dtype == np.int64 and stats.mean.dtype == np.float32
    with pytest.raises(ValueError, match=re.escape("session 2 has no training trials; cannot fit its normalisation")):
        pp.session_stats(betas, np.array([1, 1, 2]), np.array([0, 1]))


def test_averaged_repeats_keep_their_session_only_when_they_share_one():
    raw = _raw(trial_session=np.array([1, 1, 1, 1, 1, 2, 2, 2]))  # image 0: sessions {1}; 1-3: {1, 2}
    z = np.arange(24, dtype=np.float32).reshape(8, 3)
    split = pp.average_images(z, raw, np.array([0, 1, 3]), "val")
    assert split.session.tolist() == [1, pp.AVERAGED_SESSION, pp.AVERAGED_SESSION]
    np.testing.assert_array_equal(split.data, [(z[0] + z[4]) / 2, (z[1] + z[5]) / 2, (z[3] + z[7]) / 2])
    assert split.image_index.dtype == np.int64 and split.data.dtype == np.float32


@pytest.mark.parametrize("changes,message", [
    ({"image_ids": np.array([10, 11, 11, 13])}, "nsd subj01: duplicated image ids; expected one row per image"),
    ({"image_names": ["a", "b", "c"]}, "nsd subj01: images, captions, names and test flags disagree in length"),
    ({"captions": [["x"], [], ["z"], ["w"]]}, "nsd subj01: an image has no caption; expected >= 1 per image"),
    ({"trial_session": np.ones(7, np.int64)}, "nsd subj01: betas rows and trial tables disagree"),
    ({"roi_columns": {"V1": np.array([0, 1]), "higher": np.array([], np.int64)}},
     "nsd subj01: ROI(s) ['higher'] select zero voxels"),
    ({"betas": np.full((8, 3), np.nan, np.float32)}, "nsd subj01: non-finite betas"),
])
def test_every_validate_raw_message_in_full(changes, message):
    pp.validate_raw(_raw())
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        pp.validate_raw(_raw(**changes))


def test_the_prepared_file_names_its_dataset_and_stores_typed_images(tmp_path, nsd_fx):
    out = run(tmp_path, "n", nsd_root=nsd_fx.root)
    with h5py.File(out, "r") as f:
        assert f.attrs["dataset"] == "n" and f.attrs["source"] == "nsd"
        assert f["images"].dtype == np.uint8
        assert h5py.check_string_dtype(f["image_names"].dtype).encoding == "utf-8"


def test_main_needs_a_dataset_and_reads_params_yaml_by_default(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pp.main([])
    assert exit_info.value.code == 2 and "--dataset" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the default path is named in the error
    assert pp.main(["--dataset", "sim"]) != 0
    assert "error: params file not found: params.yaml (" in capsys.readouterr().err
