"""studies/controls/latent.py: the latent-Gaussian subject, and the control it exists for."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainldm.train.config import ConfigError, load_config
from brainldm.train.data.prepare import PrepareConfig
from brainldm.train.decoding.fit import deterministic
from brainldm.train.decoding.fit_config import FitConfig
from brainldm.train.evaluation.metrics import summarise

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "studies" / "controls"))
import latent  # noqa: E402

BASE = dict(nonlinearity_gain=0.1, threshold=1.0, n_train_images=50, n_test_images=20, n_repeats=3, n_latent=3,
            n_voxels=16, n_targets=5, noise_sd=1.0, noise_corr=0.0, low_snr_fraction=0.0, low_snr_scale=0.1,
            val_fraction=0.1, seed=0)


def subject(**overrides) -> latent.LatentSubject:
    return latent.LatentSubject(**{**BASE, **overrides})


def test_simulate_keeps_validation_and_test_images_out_of_the_training_trials():
    arrays = latent.simulate(subject())
    n_val = 5  # 10% of 50 training images
    assert arrays["x_train"].shape == ((50 - n_val) * 3, 16) and arrays["y_train"].shape == ((50 - n_val) * 3, 5)
    assert arrays["x_val"].shape == (n_val, 16) and arrays["x_test"].shape == (20, 16)
    assert {a.dtype for k, a in arrays.items() if k != "train_image"} == {np.dtype(np.float32)}
    assert set(arrays["train_image"]) == set(range(50 - n_val))  # every fit image, no validation image
    for image in range(50 - n_val):  # a target belongs to its image, whatever the trial
        rows = arrays["y_train"][arrays["train_image"] == image]
        assert len(rows) == 3 and np.all(rows == rows[0])
    held_out = np.concatenate([arrays["y_val"], arrays["y_test"]])
    assert not (held_out[:, None, :] == arrays["y_train"][None]).all(axis=2).any()
    again = latent.simulate(subject())
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert not np.array_equal(latent.simulate(subject(seed=1))["x_train"], arrays["x_train"])


def test_noise_is_ar1_correlated_along_the_voxels_with_unit_variance():
    rng = np.random.default_rng(0)
    noise = latent._ar1_noise(rng, 40000, 6, 0.5)
    corr = np.corrcoef(noise.T)
    np.testing.assert_allclose(noise.var(axis=0), 1, atol=0.03)
    np.testing.assert_allclose(np.diag(corr, 1), 0.5, atol=0.02)
    np.testing.assert_allclose(np.diag(corr, 2), 0.25, atol=0.02)
    assert np.abs(np.diag(np.corrcoef(latent._ar1_noise(rng, 40000, 6, 0.0).T), 1)).max() < 0.02


def test_the_low_snr_tail_scales_the_signal_of_its_share_of_voxels():
    arrays = latent.simulate(subject(n_voxels=400, noise_sd=0.0, low_snr_fraction=0.3, n_train_images=500))
    sd = arrays["x_train"].std(axis=0)
    weak = np.isclose(sd, 0.1 * np.median(sd[sd > 0.5]), rtol=0.2)
    assert 0.25 < weak.mean() < 0.35 and np.all(weak | (sd > 0.5))


def test_settings_must_name_every_field_and_nothing_else():
    defaults = {k: v for k, v in BASE.items() if k != "nonlinearity_gain"}
    assert latent.subject_from({"nonlinearity_gain": 6}, defaults).nonlinearity_gain == 6.0
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['gain'\]"):
        latent.subject_from({"nonlinearity_gain": 6, "gain": 6}, defaults)
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['nonlinearity_gain'\]"):
        latent.subject_from({}, defaults)


@pytest.fixture(scope="module")
def main_entries():
    fit = load_config(FitConfig, "fit", ROOT / "params.yaml")
    return fit, load_config(PrepareConfig, "prepare", ROOT / "params.yaml").graph


def test_run_inputs_scores_every_decoder_on_the_test_images(main_entries):
    fit, graph = main_entries
    inputs = {"subject": dataclasses.asdict(subject(n_train_images=300)), "threads": fit.threads,
              "graph": dataclasses.asdict(graph), "decoders": {"ridge-z": dataclasses.asdict(fit.decoders["ridge-z"])}}
    result = latent.run_inputs(inputs)
    scores = result["decoders"]["ridge-z"]
    assert result["n_train_trials"] == 270 * 3 and len(scores["per_image_r"]) == 20
    assert 0.5 < np.mean(scores["per_image_r"]) <= 1 and 0.5 < scores["r_per_dim"] <= 1


def test_a_nonlinear_decoder_beats_ridge_on_a_nonlinear_brain_and_not_on_a_linear_one(main_entries):
    """The seed's claim, under control: with a rectifying, sparse code (g = 6, threshold 1) the
    VAE decoder (the main params' vae-z, 10 epochs) halves ridge's test MSE; with a linear brain
    (g = 0.1), where ridge is the optimal decoder, it cannot beat ridge."""
    fit, graph = main_entries
    vae = fit.decoders["vae-z"]
    vae = dataclasses.replace(vae, optim=dataclasses.replace(vae.optim, max_epochs=10))
    gains = {}
    with deterministic(fit.threads, torch.device("cpu")):
        for gain in (0.1, 6.0):
            arrays = latent.simulate(subject(nonlinearity_gain=gain, n_train_images=1000, n_test_images=400,
                                             n_voxels=64, n_latent=4, n_targets=64, noise_sd=0.5))
            error = {name: ((arrays["y_test"] - latent.predict_test(arrays, entry, graph)) ** 2).mean(axis=1)
                     for name, entry in (("ridge", fit.decoders["ridge-z"]), ("vae", vae))}
            gains[gain] = summarise(error["ridge"] - error["vae"])  # > 0: the VAE decoder is better
    assert gains[6.0].ci_low > 0.05, gains[6.0]
    assert gains[0.1].ci_low <= 0, gains[0.1]
