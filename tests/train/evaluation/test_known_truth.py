"""The known_truth stage on a small simulated subject: the rebuilt truth is what simulate wrote, the
known noise ceilings, the noise-free oracle (better than ridge on noisy voxels, blind to test data),
the shares, and the refusal of a dataset that was not simulated."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import yaml

from brainldm.train.config import ConfigError, config_to_dict, from_dict, load_config
from brainldm.train.data import prepare
from brainldm.train.data.splits import load_inputs, load_targets
from brainldm.train.decoding.decode import stage1_metrics
from brainldm.train.decoding.fit_config import FitConfig
from brainldm.train.decoding.ridge import fit_ridge_cv
from brainldm.train.evaluation import known_truth as kt
from brainldm.train.simulation import encoding, simulate
from tests.train.simulation.test_simulate import tiny_config

ROOT = Path(__file__).resolve().parents[3]
DATASETS = ("sim-nsd", "sim-things")
ROIS = {
    "nsd": {"V1": {"atlas": "prf-visualrois", "labels": ["V1v", "V1d"]},
            "V2": {"atlas": "prf-visualrois", "labels": ["V2v", "V2d"]},
            "V3": {"atlas": "prf-visualrois", "labels": ["V3v", "V3d"]},
            "hV4": {"atlas": "prf-visualrois", "labels": ["hV4"]},
            "higher": {"atlas": "streams", "labels": ["ventral", "lateral", "parietal"]}},
    "things": {"V1": {"columns": ["V1"]}, "V2": {"columns": ["V2"]}, "V3": {"columns": ["V3"]},
               "hV4": {"columns": ["hV4"]},
               "higher": {"columns": ["lFFA", "rFFA", "VO1", "lPPA", "rPPA", "lLOC", "rLOC"]}},
}


def small_config(root: Path) -> simulate.SimulateConfig:
    """tiny_config with a few more images, so that a 5-fold ridge has something to learn."""
    base = tiny_config(root)
    return dataclasses.replace(base, nsd=dataclasses.replace(base.nsd, n_unique_images=84, n_shared_images=12),
                               things=dataclasses.replace(base.things, n_train_images=100, n_test_images=12))


def write_targets(prepared: Path, out: Path) -> None:
    """Image-derived stand-ins for the LDM's targets: z (N, 3, 4, 4) block means, c (N, 2, 3) colour stats."""
    with h5py.File(prepared, "r") as f:
        images = f["images"][()].astype(np.float32) / 255
    n, size = images.shape[:2]
    z = images.reshape(n, 4, size // 4, 4, size // 4, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
    c = np.stack([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        f["z"], f["z_mean"], f["c"] = z, z, c


def noisy_ridge(prepared: Path, targets: Path, entry, std_floor: float) -> dict:
    """The ridge decoder as fit and decode run it, on the prepared (noisy) voxels: its test metrics."""
    x, rows, _ = load_inputs(prepared, "train", entry.input_rois)
    y = load_targets(targets, entry.target, rows).reshape(len(rows), -1)
    mean, std = y.mean(0), np.maximum(y.std(0), std_floor)
    model = fit_ridge_cv(x, (y - mean) / std, list(entry.ridge.alphas), n_folds=entry.ridge.n_folds, groups=rows,
                         progress=False)
    x_test, test_rows, _ = load_inputs(prepared, "test", entry.input_rois)
    real = load_targets(targets, entry.target, test_rows)
    return {"target": entry.target, **stage1_metrics(real, (model.predict(x_test) * std + mean).reshape(real.shape))}


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> dict:
    """A simulated subject, prepared, with targets, two noisy ridge decoders' results and known_truth's output."""
    root = tmp_path_factory.mktemp("known-truth")
    sim = small_config(root / "raw")
    simulate.run(sim)
    fit = load_config(FitConfig, "fit", ROOT / "params.yaml")
    cfg = kt.KnownTruthConfig(oracle={"z": "ridge-z", "c": "ridge-c"}, decoders=("ridge-z", "ridge-c"),
                              prepared_dir=str(root / "prepared"), targets_dir=str(root / "targets"),
                              decode_dir=str(root / "decode"), out_dir=str(root / "known_truth"))
    datasets = {name: {"source": section, "root": str(getattr(sim, section).root), "subject": 1,
                       "rois": ROIS[section], **({"betas_format": "hdf5"} if section == "nsd" else {})}
                for name, (_, section) in simulate.BUILDERS.items()}
    graph = {"nodes": [["V1"], ["V2"], ["V3", "hV4"]], "threshold": 0.0, "weight_mode": "abs", "self_loops": False}
    pcfg = from_dict(prepare.PrepareConfig, {"datasets": datasets, "val_fraction": 0.1, "seed": 0,
                                             "output_dir": cfg.prepared_dir, "graph": graph})
    results = {}
    for name in DATASETS:
        prepared = prepare.run(pcfg, name)
        write_targets(prepared, Path(cfg.targets_dir) / f"{name}.h5")
        for decoder in cfg.decoders:
            got = noisy_ridge(prepared, Path(cfg.targets_dir) / f"{name}.h5", fit.decoders[decoder], fit.std_floor)
            (Path(cfg.decode_dir) / name).mkdir(parents=True, exist_ok=True)
            (Path(cfg.decode_dir) / name / f"{decoder}.json").write_text(json.dumps(got))
        results[name] = json.loads(kt.run(cfg, sim, fit, name).read_text())
    return {"root": root, "sim": sim, "fit": fit, "cfg": cfg, "results": results}


def _prepared(subject: dict, name: str) -> Path:
    return Path(subject["cfg"].prepared_dir) / f"{name}.h5"


def test_the_rebuilt_truth_is_what_simulate_wrote(subject):
    sim = subject["sim"]
    # NSD: the signal rows are subject 1's images of the written design.
    nsd = simulate.simulated_truth(sim, "sim-nsd")
    design = scipy.io.loadmat(Path(sim.nsd.root) / "nsddata/experiments/nsd/nsd_expdesign.mat")
    assert np.array_equal(nsd.image_ids, design["subjectim"][0] - 1)
    # THINGS: model + signal + the trial noise stream give the written betas exactly.
    things = simulate.simulated_truth(sim, "sim-things")
    written = pd.read_hdf(Path(sim.things.root) / "betas_csv/sub-01_ResponseData.h5", key="ResponseData")
    betas = encoding.simulate_trials(things.model, things.signal, things.design.image, things.design.session - 1,
                                     sim.encoding, simulate._rng(sim.seed, "things-trials"))
    quantum = sim.things.value_quantum
    assert np.array_equal(written["voxel_id"], things.voxel_ids)
    assert np.array_equal(written.iloc[:, 1:].to_numpy().T, np.round(betas / quantum) * quantum)
    # Both: on the prepared layout the signal tracks the single training trials far above the noise.
    for name, truth in (("sim-nsd", nsd), ("sim-things", things)):
        brain = kt.on_prepared(truth, _prepared(subject, name))
        x, rows, _ = load_inputs(_prepared(subject, name), "train", list(brain.columns))
        cols = np.concatenate(list(brain.columns.values()))
        r = kt.metrics.per_dimension_pearson(brain.signal[rows][:, cols], x)
        shuffled = kt.metrics.per_dimension_pearson(brain.signal[np.roll(rows, 7)][:, cols], x)
        assert np.median(r) > 0.4 and abs(np.median(shuffled)) < 0.15, name


def test_known_noise_ceilings(subject):
    sim = subject["sim"]
    truth = simulate.simulated_truth(sim, "sim-things")
    test_rows = np.arange(sim.things.n_train_images, len(truth.images))
    nc = kt.noise_ceiling(truth.model.amplitude, truth.signal[test_rows], sim.encoding.noise_sd,
                          np.full(len(test_rows), sim.things.n_sessions))
    in_roi = truth.model.area != ""
    assert nc[in_roi].min() > 0 and np.median(nc[in_roi]) > 40 and np.all(nc[~in_roi] == 0)
    # More repeats, higher ceilings; no noise, 100.
    more = kt.noise_ceiling(truth.model.amplitude, truth.signal[test_rows], sim.encoding.noise_sd,
                            np.full(len(test_rows), 4 * sim.things.n_sessions))
    assert np.all(more[in_roi] > nc[in_roi])
    assert np.allclose(kt.noise_ceiling(truth.model.amplitude[in_roi], truth.signal[test_rows][:, in_roi], 0.0,
                                        np.ones(len(test_rows))), 100)
    for name in DATASETS:
        ceiling = subject["results"][name]["noise_ceiling"]
        assert ceiling["n_repeats"] == 3
        for roi, row in ceiling["rois"].items():
            # the data's estimate (12 test images x 3 repeats) scatters around the known ceiling
            assert 30 < row["median"] < 95 and abs(row["data_mean"] - row["mean"]) < 25, (name, roi)
            assert row["signal_r_median"] > 0.3, (name, roi)
        assert all((row["nc_testset_mean"] is None) == (name == "sim-nsd") for row in ceiling["rois"].values())


def test_the_oracle_beats_ridge_on_noisy_voxels(subject):
    for name in DATASETS:
        result = subject["results"][name]
        for target, decoder in (("z", "ridge-z"), ("c", "ridge-c")):
            oracle = result["oracle"][target]
            noisy = json.loads((Path(subject["cfg"].decode_dir) / name / f"{decoder}.json").read_text())
            with h5py.File(_prepared(subject, name), "r") as f:  # every training trial, as fit's ridge
                assert oracle["decoder"] == decoder and oracle["n_train"] == len(f["splits/train/image_index"])
            assert oracle["ridge"] == config_to_dict(subject["fit"].decoders[decoder].ridge)
            assert oracle["pearson_dim"] > noisy["pearson_dim"] + 0.02, (name, target)
            assert oracle["identification"] >= noisy["identification"], (name, target)


def _perturbed_targets(source: Path, out: Path, rows: np.ndarray) -> Path:
    shutil.copy(source, out)
    with h5py.File(out, "r+") as f:
        for key in ("z", "c"):
            values = f[key][()]
            values[np.unique(rows)] += 5.0
            f[key][...] = values
    return out


def test_the_oracle_never_sees_test_images(subject, tmp_path):
    name, fit = "sim-nsd", subject["fit"]
    prepared, targets = _prepared(subject, name), Path(subject["cfg"].targets_dir) / f"{name}.h5"
    brain = kt.on_prepared(simulate.simulated_truth(subject["sim"], name), prepared)
    entry = fit.decoders["ridge-z"]
    base, _, _ = kt.fit_oracle(brain, targets, "z", entry, fit.std_floor)
    assert not set(brain.test) & set(brain.train)

    def perturbed(rows: np.ndarray, tag: str) -> tuple:
        signal = brain.signal.copy()
        signal[np.unique(rows)] = np.random.default_rng(0).standard_normal(signal[np.unique(rows)].shape)
        other = dataclasses.replace(brain, signal=signal)
        changed = _perturbed_targets(targets, tmp_path / f"{tag}.h5", rows)
        return kt.fit_oracle(other, changed, "z", entry, fit.std_floor)[0], other, changed

    model, other, changed = perturbed(brain.test, "test")
    assert np.array_equal(model.coef, base.coef) and np.array_equal(model.alpha_per_target, base.alpha_per_target)
    assert (kt.oracle_scores(other, changed, "z", entry, fit.std_floor)["pearson_dim"]
            != kt.oracle_scores(brain, targets, "z", entry, fit.std_floor)["pearson_dim"])
    model, _, _ = perturbed(brain.train[:30], "train")  # the control: training data does reach the fit
    assert not np.array_equal(model.coef, base.coef)


def test_shares_are_each_decoder_over_the_oracle(subject, tmp_path):
    for name in DATASETS:
        result = subject["results"][name]
        for decoder, share in result["shares"].items():
            got = json.loads((Path(subject["cfg"].decode_dir) / name / f"{decoder}.json").read_text())
            best = result["oracle"][got["target"]]
            assert share["target"] == got["target"]
            assert share["pearson_dim"] == pytest.approx(got["pearson_dim"] / best["pearson_dim"])
            assert share["identification"] == pytest.approx(got["identification"] / best["identification"])
            assert share["identification_above_chance"] == pytest.approx(
                (got["identification"] - 0.5) / (best["identification"] - 0.5))
            assert 0 < share["pearson_dim"] < 1
    # read from the files, not typed in: another decoder file, another share
    oracle = subject["results"]["sim-nsd"]["oracle"]
    (tmp_path / "half-z.json").write_text(json.dumps({"target": "z", "pearson_dim": oracle["z"]["pearson_dim"] / 2,
                                                      "identification": 0.5}))
    share = kt.shares(oracle, tmp_path, ("half-z",))["half-z"]
    assert share["pearson_dim"] == pytest.approx(0.5) and share["identification_above_chance"] == 0
    with pytest.raises(FileNotFoundError, match="decode stage"):
        kt.shares(oracle, tmp_path, ("absent",))


def test_a_dataset_that_was_not_simulated_is_refused(subject, tmp_path, capsys):
    cfg = dataclasses.replace(subject["cfg"], prepared_dir=str(tmp_path))
    shutil.copy(_prepared(subject, "sim-nsd"), tmp_path / "real.h5")
    with h5py.File(tmp_path / "real.h5", "r+") as f:
        config = json.loads(f.attrs["config"])
        config["datasets"]["sim-nsd"]["root"] = "/data/natural-scenes-dataset"
        f.attrs["config"] = json.dumps(config)
    with pytest.raises(ValueError, match="known truth exists only for simulated subjects"):
        kt.run(cfg, subject["sim"], subject["fit"], "real")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"known_truth": config_to_dict(cfg), "simulate": config_to_dict(subject["sim"]),
                                      "fit": yaml.safe_load((ROOT / "params.yaml").read_text())["fit"]}))
    assert kt.main(["--params", str(params), "--dataset", "real"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: known truth exists only for simulated subjects") and error.count("\n") == 1
    assert not (Path(cfg.out_dir) / "real.json").exists()


def test_prepared_voxels_or_images_without_truth_raise(subject):
    truth = simulate.simulated_truth(subject["sim"], "sim-things")
    prepared = _prepared(subject, "sim-things")
    with pytest.raises(ValueError, match="images have no simulated truth"):
        kt.on_prepared(dataclasses.replace(truth, image_ids=truth.image_ids + 10_000), prepared)
    with pytest.raises(ValueError, match="voxels have no simulated truth"):
        kt.on_prepared(dataclasses.replace(truth, voxel_ids=truth.voxel_ids[::2]), prepared)


def test_config_section_and_oracle_entries(tmp_path):
    cfg = load_config(kt.KnownTruthConfig, "known_truth", ROOT / "params.yaml")
    fit = load_config(FitConfig, "fit", ROOT / "params.yaml")
    assert {t: kt.oracle_entry(fit, t, n).kind for t, n in cfg.oracle.items()} == {"z": "ridge", "c": "ridge"}
    with pytest.raises(ConfigError, match="expected a ridge decoder of z"):
        kt.oracle_entry(fit, "z", "cnn-z")
    with pytest.raises(ConfigError, match="expected a ridge decoder of c"):
        kt.oracle_entry(fit, "c", "ridge-z")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"known_truth": {**config_to_dict(cfg), "seed": 1}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['seed'\]"):
        load_config(kt.KnownTruthConfig, "known_truth", params)
