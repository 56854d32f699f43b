"""decode stage: test-split predictions, stage-1 metrics, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from brainldm.train.config import from_dict
from brainldm.train.decoding import decode, fit
from brainldm.train.decoding.decode import DecodeConfig, main, stage1_metrics
from brainldm.train.decoding.decoders import load_checkpoint

from tests.train.decoding.test_fit import C_SHAPE, DECODERS, LOWER, N_IMAGES, Z_SHAPE, fit_config, make_fake_data


def decode_config(root: Path) -> DecodeConfig:
    return from_dict(DecodeConfig, {
        "prepared_dir": str(root / "prepared"), "targets_dir": str(root / "targets"),
        "models_dir": str(root / "models"), "results_dir": str(root / "results" / "decode"),
        "batch_size": 7, "threads": 1,
    })


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = make_fake_data(tmp_path_factory.mktemp("decode"))
    for name in ("cnn-z", "cnn-c", "gcn-z"):
        fit.run(fit_config(root), "fake", name)
    return root


def test_stage1_metrics_values():
    real = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pred = real * 2.0
    m = stage1_metrics(real, pred)
    assert m["mse"] == pytest.approx(np.mean(real ** 2))
    assert m["pearson_sample"] == pytest.approx(1.0) and m["pearson_dim"] == pytest.approx(1.0)
    assert m["identification"] == 1.0 and m["identification_chance"] == 0.5 and m["n"] == 3 and m["n_dims"] == 3
    with pytest.raises(ValueError, match="matching"):
        stage1_metrics(real, pred[:, :2])


@pytest.mark.parametrize("name,shape", [("cnn-z", Z_SHAPE), ("cnn-c", C_SHAPE), ("gcn-z", Z_SHAPE)])
def test_decode_writes_test_predictions_and_metrics(fitted, name, shape):
    m = decode.run(decode_config(fitted), "fake", name)
    out = fitted / "results" / "decode" / "fake"
    with h5py.File(out / f"{name}.h5") as f, h5py.File(fitted / "prepared" / "fake.h5") as p, \
            h5py.File(fitted / "targets" / "fake.h5") as t:
        pred, index = f["pred"][()], f["image_index"][()]
        assert json.loads(f.attrs["config"])["batch_size"] == 7
        np.testing.assert_array_equal(index, p["splits/test/image_index"][()])
        real = t[DECODERS[name]["target"]][()][index]
        rois = DECODERS[name]["input_rois"]
        x = np.concatenate([p[f"splits/test/rois/{r}"][()] for r in rois], axis=1)
    assert pred.shape == (N_IMAGES["test"],) + shape and pred.dtype == np.float32
    ckpt = load_checkpoint(fitted / "models" / "fake" / f"{name}.safetensors")
    np.testing.assert_allclose(pred, ckpt.predictor()(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert m == json.loads((out / f"{name}.json").read_text())
    assert m["split"] == "test" and m["n"] == N_IMAGES["test"]
    assert m["mse"] == pytest.approx(float(np.mean((pred.astype(np.float64) - real) ** 2)), rel=1e-5)
    assert m["identification"] > 0.9 and m["pearson_dim"] > 0.5


def test_ceiling_and_floor_rows(fitted, tmp_path):
    """Table 3's reference rows: the ceiling scores the posterior mean (z_mean) against the target,
    and the floor predicts the training images' mean target, with no test image in that mean."""
    data = make_fake_data(tmp_path / "sample")
    (data / "models").symlink_to(fitted / "models", target_is_directory=True)
    with h5py.File(data / "prepared" / "fake.h5") as p:
        train_rows = np.unique(p["splits/train/image_index"][()])
        test_rows = p["splits/test/image_index"][()]
    rng = np.random.default_rng(0)
    with h5py.File(data / "targets" / "fake.h5", "a") as f:
        z_mean = f["z"][()]
        sample = z_mean + rng.standard_normal(z_mean.shape).astype(np.float32)  # a posterior sample's noise
        del f["z"]
        f["z"] = sample
        f.attrs["latent"] = "sample"
    m = decode.run(decode_config(data), "fake", "cnn-z")
    assert m["z_latent"] == "sample"
    assert m["ceiling"] == stage1_metrics(sample[test_rows], z_mean[test_rows])
    assert m["ceiling"]["pearson_dim"] < 0.99  # the posterior noise caps even a perfect predictor
    floor = np.mean((sample[test_rows].astype(np.float64) - sample[train_rows].mean(0)) ** 2)
    assert m["floor"]["mse"] == pytest.approx(floor, rel=1e-6)
    # A test-only image's target moves the test scores but not the floor's prediction.
    test_only = np.setdiff1d(test_rows, train_rows)[0]
    with h5py.File(data / "targets" / "fake.h5", "a") as f:
        f["z"][test_only] += 5.0
        moved = f["z"][()]
    again = decode.run(decode_config(data), "fake", "cnn-z")
    expected = np.mean((moved[test_rows].astype(np.float64) - sample[train_rows].mean(0)) ** 2)
    assert again["floor"]["mse"] == pytest.approx(expected, rel=1e-6) and again["floor"]["mse"] > floor
    # With latent: mean the target is its own perfect predictor.
    c = decode.run(decode_config(fitted), "fake", "cnn-c")["ceiling"]
    assert c["mse"] == 0.0 and c["pearson_dim"] == pytest.approx(1.0) and c["identification"] == 1.0


def test_decode_bad_inputs(fitted, tmp_path, capsys):
    config = decode_config(fitted)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        decode.run(config, "fake", "nope")
    bad = make_fake_data(tmp_path)
    (bad / "models").symlink_to(fitted / "models", target_is_directory=True)
    with h5py.File(bad / "prepared" / "fake.h5", "a") as f:
        f["splits/test/rois/V1"][2, 1] = np.nan
    with pytest.raises(ValueError, match="splits/test/rois/V1 contains NaN"):
        decode.run(decode_config(bad), "fake", "cnn-z")
    with h5py.File(bad / "prepared" / "fake.h5", "a") as f:
        v2 = f["splits/test/rois/V2"][()]
        del f["splits/test/rois/V2"], f["splits/test/rois/V1"]
        f["splits/test/rois/V1"] = np.zeros((N_IMAGES["test"], 14), np.float32)
        f["splits/test/rois/V2"] = np.concatenate([v2, v2[:, :1]], axis=1)
    with pytest.raises(ValueError, match=r"voxel counts .*'V2': 13.* differ from the fitted decoder's .*'V2': 12"):
        decode.run(decode_config(bad), "fake", "cnn-z")
    fixed = make_fake_data(tmp_path / "fixed")
    (fixed / "models").symlink_to(fitted / "models", target_is_directory=True)
    with h5py.File(fixed / "targets" / "fake.h5", "a") as f:
        z = f["z"][()]
        del f["z"]
        f["z"] = z[:, :2]
    with pytest.raises(ValueError, match=r"targets z have shape \(2, 2, 2\) per image; the decoder predicts"):
        decode.run(decode_config(fixed), "fake", "cnn-z")
    assert not (fixed / "results").exists() and not (bad / "results").exists()
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"decode": {"models_dir": str(fitted / "models"), "prepared_dir": "data/prepared",
                                             "targets_dir": "data/targets", "results_dir": "results/decode",
                                             "batch_size": 256, "threads": 1, "device": "cpu"}}))
    assert main(["--params", str(params), "--dataset", "fake", "--decoder", "nope"]) == 1
    assert "error: decoder checkpoint not found" in capsys.readouterr().err


PERTURBATION = 3.0  # added to one ROI's test voxels (their sd is a few units)


def _decode_with_perturbed_roi(fitted: Path, root: Path, roi: str | None, decoder: str = "cnn-z") -> np.ndarray:
    """The decode stage's test predictions after adding PERTURBATION to ``roi``'s test voxels (None: none)."""
    data = make_fake_data(root)
    (data / "models").symlink_to(fitted / "models", target_is_directory=True)
    with h5py.File(data / "prepared" / "fake.h5", "a") as f:
        if roi is not None:
            f[f"splits/test/rois/{roi}"][...] += PERTURBATION
    decode.run(decode_config(data), "fake", decoder)
    with h5py.File(data / "results" / "decode" / "fake" / f"{decoder}.h5") as f:
        return f["pred"][()]


def test_z_decoder_reads_exactly_the_lower_rois(fitted, tmp_path):
    """The decode stage feeds cnn-z the lower ROIs and nothing else: only they move its predictions."""
    reference = _decode_with_perturbed_roi(fitted, tmp_path / "none", None)
    np.testing.assert_array_equal(_decode_with_perturbed_roi(fitted, tmp_path / "higher", "higher"), reference)
    for roi in LOWER:
        moved = np.abs(_decode_with_perturbed_roi(fitted, tmp_path / roi, roi) - reference).max()
        assert moved > 1e-3, f"perturbing {roi} did not change the z predictions"
