"""The simulate stage: formats read back with the real libraries, design consistency, determinism."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from brainldm.train.simulation import encoding, simulate
from brainldm.train.config import config_to_dict
from brainldm.train.simulation.simulate import NsdSimConfig, SimulateConfig, ThingsSimConfig

NSD_ROIS = {"V1": 40, "V2": 35, "V3": 30, "hV4": 20, "mid": 25, "high": 40}
THINGS_ROIS = {"V1": 30, "V2": 25, "V3": 20, "hV4": 15, "LO1": 8, "VO1": 8, "FFA": 8, "PPA": 6, "LOC": 8}
BETAS = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
ROIDIR = "nsddata/ppdata/subj01/func1pt8mm/roi"
EXPDIR = "nsddata/experiments/nsd"


def tiny_config(root: Path, **nsd_overrides) -> SimulateConfig:
    """A few sessions, a few dozen images, a 10x12x10 grid."""
    return SimulateConfig(
        seed=3, image_size=32, n_captions=2,
        encoding=encoding.EncodingConfig(feature_grid=16),
        nsd=NsdSimConfig(root=str(root / "sim-nsd"), n_sessions=3, runs_per_session=2, n_unique_images=30,
                         n_shared_images=6, n_extra_images=8, grid=(10, 12, 10), roi_voxels=NSD_ROIS,
                         **nsd_overrides),
        things=ThingsSimConfig(root=str(root / "sim-things"), n_train_images=40, n_test_images=6, n_sessions=3,
                               runs_per_session=2, grid=(10, 12, 10), roi_voxels=THINGS_ROIS),
    )


file_hashes = simulate.tree_digest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[SimulateConfig, dict, Path]:
    root = tmp_path_factory.mktemp("a")
    config = tiny_config(root)
    return config, simulate.run(config), root


def test_bit_for_bit_reproducible(built, tmp_path):
    config_a, _, root_a = built
    time.sleep(1.1)  # any embedded timestamp would now differ
    simulate.run(tiny_config(tmp_path))
    for name in ("sim-nsd", "sim-things"):
        hashes_a, hashes_b = file_hashes(root_a / name), file_hashes(tmp_path / name)
        assert len(hashes_a) > 10 and hashes_a == hashes_b
    other_seed = replace(tiny_config(tmp_path / "c"), seed=4)
    simulate.run(other_seed, ("sim-nsd",))
    assert file_hashes(tmp_path / "c/sim-nsd") != file_hashes(root_a / "sim-nsd")


def test_verify_detects_identical_and_changed_data(tmp_path):
    config = tiny_config(tmp_path)
    simulate.run(config)
    report = tmp_path / "verify.json"
    assert simulate.verify(config, report) == {"sim-nsd": True, "sim-things": True}
    concepts = tmp_path / "sim-things" / "things_concepts.tsv"
    concepts.write_text(concepts.read_text() + "extra\trow\n")
    assert simulate.verify(config, report) == {"sim-nsd": True, "sim-things": False}
    assert "things_concepts.tsv" in report.read_text()


def test_summary_and_no_leftovers(built):
    config, summaries, root = built
    assert summaries["sim-nsd"]["trials"] == 36 * 3 and summaries["sim-nsd"]["images"] == 44
    assert summaries["sim-things"]["trials"] == 40 + 6 * 3
    assert sorted(p.name for p in root.iterdir()) == ["sim-nsd", "sim-things"]  # temp folders renamed away


def test_nsd_expdesign_matches_responses_and_stim_info(built):
    config, _, root = built
    nsd = root / "sim-nsd"
    design = scipy.io.loadmat(nsd / EXPDIR / "nsd_expdesign.mat")
    order, subjectim, sharedix = design["masterordering"], design["subjectim"], design["sharedix"]
    assert order.shape == (1, 108) and subjectim.shape == (8, 36) and sharedix.shape == (1, 6)
    assert order.min() == 1 and order.max() == 36 and np.all(np.bincount(order[0])[1:] == 3)
    for s in range(8):  # shared images first in every subject's list
        assert np.array_equal(subjectim[s, :6], sharedix[0]) and len(np.unique(subjectim[s])) == 36
    responses = pd.read_csv(nsd / "nsddata/ppdata/subj01/behav/responses.tsv", sep="\t")
    assert list(responses.columns[:6]) == ["SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID"]
    assert np.array_equal(responses["10KID"], order[0])
    assert np.array_equal(responses["73KID"], subjectim[0, order[0] - 1])
    assert np.array_equal(np.bincount(responses["SESSION"])[1:], [36, 36, 36])
    info = pd.read_csv(nsd / EXPDIR / "nsd_stim_info_merged.csv", index_col=0)
    assert len(info) == 44 and np.array_equal(info.index, info["nsdId"]) and np.array_equal(info.index, np.arange(44))
    assert set(np.flatnonzero(info["shared1000"])) == set(sharedix[0] - 1)
    assert set(info["cocoSplit"]) <= {"train2017", "val2017"} and info["cocoId"].is_unique
    for s in range(1, 9):
        assert set(np.flatnonzero(info[f"subject{s}"])) == set(subjectim[s - 1] - 1)
    # Every trial of subject 1 is one rep column entry of its image, in trial order.
    reps = info[["subject1_rep0", "subject1_rep1", "subject1_rep2"]].to_numpy()
    shown = reps[subjectim[0] - 1]
    assert np.all(shown > 0) and np.all(np.diff(shown, axis=1) > 0)
    trial_image = np.zeros(109, dtype=np.int64)
    trial_image[shown.ravel()] = np.repeat(subjectim[0] - 1, 3)
    assert np.array_equal(trial_image[1:], responses["73KID"] - 1)
    assert reps[np.setdiff1d(np.arange(44), subjectim[0] - 1)].sum() == 0


def test_nsd_rois_labels_and_betas(built):
    config, _, root = built
    nsd = root / "sim-nsd"
    rois = {n: nib.load(nsd / ROIDIR / f"{n}.nii.gz") for n in ("prf-visualrois", "streams", "nsdgeneral")}
    prf = np.asarray(rois["prf-visualrois"].dataobj)
    assert prf.dtype == np.int16 and prf.shape == (10, 12, 10)
    assert np.allclose(np.diag(rois["prf-visualrois"].affine)[:3], 1.8)
    assert set(np.unique(prf)) == {-1, 0, 1, 2, 3, 4, 5, 6, 7}
    counts = np.bincount(prf[prf > 0], minlength=8)
    assert [counts[1] + counts[2], counts[3] + counts[4], counts[5] + counts[6], counts[7]] == [40, 35, 30, 20]
    streams = np.asarray(rois["streams"].dataobj)
    assert set(np.unique(streams)) <= set(range(-1, 8)) and np.all((streams == 1) == np.isin(prf, range(1, 7)))
    general = np.asarray(rois["nsdgeneral"].dataobj)
    assert set(np.unique(general)) == {-1, 0, 1} and (general == 1).sum() == sum(NSD_ROIS.values())
    ctab = (nsd / "nsddata/freesurfer/fsaverage/label/prf-visualrois.mgz.ctab").read_text().splitlines()
    assert ctab[0] == "0 Unknown" and ctab[7] == "7 hV4"
    brain = prf >= 0
    with h5py.File(nsd / BETAS / "betas_session02.hdf5") as handle:
        betas = handle["betas"][()]
    assert betas.dtype == np.int16 and betas.shape == (36, 10, 12, 10)
    volume = betas.transpose(0, 3, 2, 1)  # -> (T, X, Y, Z) like the ROI volumes
    assert np.all(volume[:, ~brain] == 0) and np.all((volume[:, brain] != 0).mean(axis=0) > 0.9)
    percent = volume[:, brain] / 300.0
    assert 0.5 < percent.std() < 5.0  # percent signal change, stored x300


def test_nsd_nifti_betas_equal_hdf5(built, tmp_path):
    config, _, root = built
    nifti_config = tiny_config(tmp_path, betas_format="nifti")
    simulate.run(nifti_config, ("sim-nsd",))
    image = nib.load(tmp_path / "sim-nsd" / BETAS / "betas_session01.nii.gz")
    assert image.get_data_dtype() == np.int16 and image.shape == (10, 12, 10, 36)
    with h5py.File(root / "sim-nsd" / BETAS / "betas_session01.hdf5") as handle:
        expected = handle["betas"][()].transpose(3, 2, 1, 0)
    assert np.array_equal(np.asarray(image.dataobj), expected)


def test_nsd_stimuli_and_captions(built):
    config, _, root = built
    nsd = root / "sim-nsd/nsddata_stimuli/stimuli/nsd"
    with h5py.File(nsd / "nsd_stimuli.hdf5") as handle:
        brick = handle["imgBrick"]
        assert brick.shape == (44, 32, 32, 3) and brick.dtype == np.uint8 and brick[()].std() > 10
    info = pd.read_csv(root / "sim-nsd" / EXPDIR / "nsd_stim_info_merged.csv", index_col=0)
    annotation_ids = []
    for split in ("train", "val"):
        coco = json.loads((nsd / f"annotations/captions_{split}2017.json").read_text())
        ids = {img["id"] for img in coco["images"]}
        assert ids == set(info.loc[info["cocoSplit"] == f"{split}2017", "cocoId"])
        per_image = pd.Series([a["image_id"] for a in coco["annotations"]]).value_counts()
        assert len(ids) == 0 or set(per_image) == {2}
        annotation_ids += [a["id"] for a in coco["annotations"]]
    assert len(annotation_ids) == len(set(annotation_ids)) == 44 * 2


def _nsd_split_half(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel correlation of repeat 1 vs repeat 2 over images, read through the public formats."""
    nsd = root / "sim-nsd"
    responses = pd.read_csv(nsd / "nsddata/ppdata/subj01/behav/responses.tsv", sep="\t")
    general = np.asarray(nib.load(nsd / ROIDIR / "nsdgeneral.nii.gz").dataobj)
    prf = np.asarray(nib.load(nsd / ROIDIR / "prf-visualrois.nii.gz").dataobj)
    brain = general >= 0
    betas = []
    for s in sorted(responses["SESSION"].unique()):
        with h5py.File(nsd / BETAS / f"betas_session{s:02d}.hdf5") as handle:
            session = handle["betas"][()].transpose(0, 3, 2, 1)[:, brain] / 300.0
        betas.append((session - session.mean(0)) / session.std(0))  # per-session z-score
    betas = np.concatenate(betas)
    order = np.lexsort((np.arange(len(responses)), responses["73KID"]))
    reps = betas[order].reshape(-1, 3, betas.shape[1])
    a, b = reps[:, 0] - reps[:, 0].mean(0), reps[:, 1] - reps[:, 1].mean(0)
    r = (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return r, prf[brain], general[brain]


def test_nsd_lower_areas_carry_stimulus_information(built):
    _, _, root = built
    r, prf, general = _nsd_split_half(root)
    assert r[prf > 0].mean() > 0.2
    assert abs(r[general == 0].mean()) < 0.06


def test_things_tables(built):
    config, _, root = built
    things = root / "sim-things"
    data = pd.read_hdf(things / "betas_csv/sub-01_ResponseData.h5", key="ResponseData")
    voxels = pd.read_csv(things / "betas_csv/sub-01_VoxelMetadata.csv")
    stimuli = pd.read_csv(things / "betas_csv/sub-01_StimulusMetadata.csv")
    assert list(data.columns) == ["voxel_id", *range(58)] and len(stimuli) == 58
    assert (data.dtypes.iloc[1:] == np.float32).all() and np.array_equal(data["voxel_id"], voxels["voxel_id"])
    assert list(stimuli.columns) == ["trial_type", "session", "run", "subject_id", "trial_id", "stimulus"]
    assert stimuli["trial_type"].value_counts().to_dict() == {"train": 40, "test": 18}
    test = stimuli[stimuli["trial_type"] == "test"]
    assert all(sorted(group) == [1, 2, 3] for _, group in test.groupby("stimulus")["session"])
    assert stimuli.loc[stimuli["trial_type"] == "train", "stimulus"].is_unique
    assert len(set(stimuli["stimulus"])) == 46
    for stimulus in stimuli["stimulus"]:
        assert (things / "object_images" / stimulus.rsplit("_", 1)[0] / stimulus).is_file()
    concepts = pd.read_csv(things / "things_concepts.tsv", sep="\t")
    assert {"Word", "uniqueID", "Definition (from WordNet, Google, or Wikipedia)"} <= set(concepts.columns)
    assert set(stimuli["stimulus"].str.rsplit("_", n=1).str[0]) == set(concepts["uniqueID"])
    for column, expected in (("V1", 30), ("lFFA", 8), ("rFFA", 8), ("LO1 (prf)", 8), ("rPPA", 6), ("TO2", 0)):
        assert set(voxels[column]) <= {0, 1} and voxels[column].sum() == expected
    assert np.array_equal(voxels["voxel_id"], np.ravel_multi_index(
        (voxels["voxel_x"], voxels["voxel_y"], voxels["voxel_z"]), (10, 12, 10)))


def test_things_test_repeats_reliable_in_rois_only(built):
    _, _, root = built
    things = root / "sim-things/betas_csv"
    data = pd.read_hdf(things / "sub-01_ResponseData.h5", key="ResponseData").iloc[:, 1:].to_numpy().T
    voxels = pd.read_csv(things / "sub-01_VoxelMetadata.csv")
    stimuli = pd.read_csv(things / "sub-01_StimulusMetadata.csv")
    in_roi = voxels[["V1", "V2", "V3", "hV4"]].sum(axis=1).to_numpy() > 0
    outside = voxels.iloc[:, 11:39].sum(axis=1).to_numpy() == 0  # the 28 ROI columns
    # 6 images x 3 repeats: the noise-ceiling estimate is biased upwards where there is no signal.
    assert voxels.loc[in_roi, "nc_testset"].mean() > 40 > 20 > voxels.loc[outside, "nc_testset"].mean()
    train = stimuli["trial_type"] == "train"
    assert data[train.to_numpy()].shape == (40, len(voxels))


def test_cli_writes_and_reports_errors(tmp_path, capsys):
    config = tiny_config(tmp_path)
    params = tmp_path / "params.yaml"
    section = config_to_dict(config)
    params.write_text(json.dumps({"simulate": section}))
    assert simulate.main(["--params", str(params), "--dataset", "sim-nsd"]) == 0
    assert "sim-nsd" in capsys.readouterr().out and (tmp_path / "sim-nsd" / EXPDIR).is_dir()
    section["nsd"]["n_sessions"] = 5  # 108 trials do not split into 5 sessions
    params.write_text(json.dumps({"simulate": section}))
    assert simulate.main(["--params", str(params), "--dataset", "sim-nsd"]) == 1
    assert "n_sessions=5" in capsys.readouterr().err
    section["nsd"]["bogus"] = 1
    params.write_text(json.dumps({"simulate": section}))
    assert simulate.main(["--params", str(params)]) == 1
    assert "bogus" in capsys.readouterr().err


def test_bad_layout_and_format_raise(tmp_path):
    small = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        simulate.run(replace(small, nsd=replace(small.nsd, grid=(6, 6, 6))), ("sim-nsd",))
    with pytest.raises(ValueError, match="betas_format"):
        simulate.run(replace(small, nsd=replace(small.nsd, betas_format="mgz")), ("sim-nsd",))
    assert not (tmp_path / "sim-nsd").exists()


def test_nsdgeneral_roi_through_the_loader_holds_the_decoding_rois(built):
    # MindEye's whole-visual-cortex ROI: one integer label, no colour table needed.
    from brainldm.train.config import from_dict
    from brainldm.train.data import nsd as nsd_loader
    from brainldm.train.data.prepare import DatasetConfig

    _, _, root = built
    rois = {"nsdgeneral": {"atlas": "nsdgeneral", "labels": [1]},
            "V1": {"atlas": "prf-visualrois", "labels": ["V1v", "V1d"]},
            "higher": {"atlas": "streams", "labels": ["ventral", "lateral", "parietal"]}}
    raw = nsd_loader.load(from_dict(DatasetConfig, {"source": "nsd", "root": str(root / "sim-nsd"), "subject": 1,
                                                    "rois": rois, "betas_format": "hdf5"}))
    general = set(raw.roi_columns["nsdgeneral"].tolist())
    assert len(general) == len(raw.voxel_ids)  # the other ROIs lie inside it
    assert set(raw.roi_columns["V1"].tolist()) < general and set(raw.roi_columns["higher"].tolist()) < general
