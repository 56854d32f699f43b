"""fit stage: determinism, no test-data leakage, learning on a synthetic nonlinear problem, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from brainldm.train.config import ConfigError, from_dict
from brainldm.train.decoding.decoders import load_checkpoint
from brainldm.train.decoding import fit
from brainldm.train.decoding.fit import FitConfig, decoder_config, main

ROI_SIZES = {"V1": 14, "V2": 12, "V3": 7, "hV4": 6, "higher": 16}
NODE_ROIS = [["V1"], ["V2"], ["V3", "hV4"]]
N_IMAGES = {"train": 160, "val": 32, "test": 32}
TRAIN_REPEATS = 2
N_FACTORS = 4
Z_SHAPE = (4, 2, 2)
C_SHAPE = (3, 5)
TRIAL_NOISE = 0.3
LOWER = ["V1", "V2", "V3", "hV4"]


def make_fake_data(root: Path, name: str = "fake", seed: int = 0, test_shift: float = 0.0) -> Path:
    """Write ``root/prepared/<name>.h5`` and ``root/targets/<name>.h5`` (the two contract schemas).

    Images have hidden factors s (N, 4); every ROI responds linearly to s plus trial
    noise; z and c are nonlinear functions of s. ``test_shift`` perturbs ONLY the test
    split's voxels and the test images' target rows. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    n_total = sum(N_IMAGES.values())
    factors = rng.standard_normal((n_total, N_FACTORS))
    mix_z = rng.standard_normal((N_FACTORS, int(np.prod(Z_SHAPE))))
    mix_c = rng.standard_normal((N_FACTORS, int(np.prod(C_SHAPE))))
    z = (np.tanh(factors @ mix_z) + 0.3 * (factors @ mix_z) ** 2).reshape((n_total,) + Z_SHAPE)
    c = np.sin(factors @ mix_c).reshape((n_total,) + C_SHAPE)
    weights = {roi: rng.standard_normal((N_FACTORS, v)) for roi, v in ROI_SIZES.items()}
    starts = np.cumsum([0] + list(N_IMAGES.values()))
    test_rows = np.arange(starts[2], starts[3])
    z[test_rows] += test_shift
    c[test_rows] -= test_shift
    for sub in ("prepared", "targets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "prepared" / f"{name}.h5", "w") as f:
        f.attrs.update(format_version=1, dataset=name, subject="subj01", source="nsd", config="{}")
        f["images"] = rng.integers(0, 255, (n_total, 8, 8, 3), dtype=np.uint8)
        f["image_ids"] = np.arange(n_total, dtype=np.int64)
        for i, split in enumerate(N_IMAGES):
            index = np.arange(starts[i], starts[i + 1])
            repeats = TRAIN_REPEATS if split == "train" else 1
            index = np.tile(index, repeats)
            noise = TRIAL_NOISE / np.sqrt(1 if split == "train" else TRAIN_REPEATS)
            f[f"splits/{split}/image_index"] = index.astype(np.int64)
            f[f"splits/{split}/session"] = np.full(len(index), 1 if split == "train" else -1, dtype=np.int64)
            for roi, w in weights.items():
                x = factors[index] @ w + noise * rng.standard_normal((len(index), w.shape[1]))
                if split == "test":
                    x = x + test_shift
                f[f"splits/{split}/rois/{roi}"] = x.astype(np.float32)
        f["graph/edge_index"] = np.array([[0, 1, 0, 2, 1, 2], [1, 0, 2, 0, 2, 1]], dtype=np.int64)
        f["graph/edge_weight"] = np.array([0.6, 0.6, 0.3, 0.3, 0.5, 0.5], dtype=np.float32)
        f["graph/node_rois"] = json.dumps(NODE_ROIS)
        f["graph"].attrs["pad_length"] = max(sum(ROI_SIZES[r] for r in n) for n in NODE_ROIS)
    with h5py.File(root / "targets" / f"{name}.h5", "w") as f:
        f["z"] = z.astype(np.float32)
        f["z_mean"] = z.astype(np.float32)  # targets.latent: mean
        f["c"] = c.astype(np.float32)
        f.attrs["config"] = "{}"
        f.attrs["latent"] = "mean"
    return root


FAST_OPTIM = {"lr": 3e-3, "weight_decay": 1e-4, "batch_size": 32, "max_epochs": 25, "patience": 4}
DECODERS = {
    "cnn-z": {"kind": "cnn", "target": "z", "input_rois": LOWER, "seed": 0, "optim": FAST_OPTIM,
              "cnn": {"channels": 4, "n_blocks": 1, "kernel_size": 3, "stem_stride": 1, "pool": 2,
                      "hidden": [64, 64], "dropout": 0.0}},
    "cnn-c": {"kind": "cnn", "target": "c", "input_rois": ["higher"], "seed": 0, "optim": FAST_OPTIM,
              "cnn": {"channels": 4, "n_blocks": 1, "kernel_size": 3, "stem_stride": 1, "pool": 2,
                      "hidden": [64, 64], "dropout": 0.0}},
    "vae-z": {"kind": "vae", "target": "z", "input_rois": LOWER, "seed": 0, "optim": FAST_OPTIM,
              "vae": {"hidden": 64, "recon_hidden": 32, "dropout": 0.0, "beta": 1e-3, "gamma": 0.1}},
    "gcn-z": {"kind": "gcn", "target": "z", "input_rois": LOWER, "seed": 0, "optim": FAST_OPTIM,
              "gcn": {"hidden": 16, "cheb_k": 2, "pooling": "flatten", "head_hidden": 64, "dropout": 0.0}},
    "ridge-z": {"kind": "ridge", "target": "z", "input_rois": LOWER,
                "ridge": {"alphas": [0.1, 1.0, 10.0, 100.0], "n_folds": 3}},
}


def fit_config(root: Path, **decoders) -> FitConfig:
    return from_dict(FitConfig, {
        "prepared_dir": str(root / "prepared"), "targets_dir": str(root / "targets"),
        "models_dir": str(root / "models"), "results_dir": str(root / "results" / "fit"), "threads": 1,
        "decoders": decoders or DECODERS,
    })


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """All torch decoders fitted once on the default fake data: {name: val metrics}."""
    root = make_fake_data(tmp_path_factory.mktemp("fit"))
    config = fit_config(root)
    return root, {name: fit.run(config, "fake", name) for name in ("cnn-z", "cnn-c", "vae-z", "gcn-z")}


@pytest.mark.parametrize("name", ["cnn-z", "cnn-c", "vae-z", "gcn-z"])
def test_networks_learn_a_nonlinear_map_beyond_chance(fitted, name):
    root, metrics = fitted
    m = metrics[name]
    assert m["split"] == "val" and m["n"] == N_IMAGES["val"]
    assert m["identification"] > 0.9 > m["identification_chance"]
    assert m["pearson_dim"] > 0.5
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= FAST_OPTIM["max_epochs"]
    rows = (root / "results" / "fit" / "fake" / name / "loss.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss" and len(rows) == m["epochs_run"] + 1
    assert json.loads((root / "results" / "fit" / "fake" / name / "metrics.json").read_text()) == m


def test_checkpoint_holds_spec_stats_and_reproduces_val_metrics(fitted):
    root, metrics = fitted
    ckpt = load_checkpoint(root / "models" / "fake" / "gcn-z.safetensors")
    assert ckpt.spec.input_rois == tuple(LOWER) and ckpt.spec.target_shape == Z_SHAPE
    assert ckpt.spec.roi_sizes == tuple(ROI_SIZES[r] for r in LOWER)
    assert ckpt.spec.node_rois == tuple(tuple(n) for n in NODE_ROIS)
    assert ckpt.config["entry"]["gcn"]["pooling"] == "flatten"
    with h5py.File(root / "targets" / "fake.h5") as t, h5py.File(root / "prepared" / "fake.h5") as p:
        train_rows = np.asarray(p["splits/train/image_index"])
        z = np.asarray(t["z"])[train_rows].reshape(len(train_rows), -1)
        x_val = np.concatenate([np.asarray(p[f"splits/val/rois/{r}"]) for r in LOWER], axis=1)
        z_val = np.asarray(t["z"])[np.asarray(p["splits/val/image_index"])]
    np.testing.assert_allclose(ckpt.target_mean.numpy(), z.mean(0), atol=1e-5)
    np.testing.assert_allclose(ckpt.target_std.numpy(), z.std(0), rtol=1e-4)
    pred = ckpt.predictor()(torch.from_numpy(x_val)).detach().numpy()
    assert pred.shape == z_val.shape
    assert np.mean((pred - z_val) ** 2) == pytest.approx(metrics["gcn-z"]["mse"], rel=1e-4)


@pytest.mark.parametrize("name", ["cnn-z", "vae-z", "gcn-z"])
def test_test_split_never_reaches_fitting(tmp_path, name):
    """Perturbing only the test split (voxels and test targets) leaves checkpoint bytes unchanged."""
    entry = dict(DECODERS[name], optim=dict(FAST_OPTIM, max_epochs=6))
    outputs, test_voxels = [], []
    for shift in (0.0, 5.0):
        make_fake_data(tmp_path, test_shift=shift)  # same paths: the config (and metadata) are identical
        fit.run(fit_config(tmp_path, **{name: entry}), "fake", name)
        outputs.append([(tmp_path / p).read_bytes() for p in (f"models/fake/{name}.safetensors",
                                                               f"results/fit/fake/{name}/loss.csv")])
        with h5py.File(tmp_path / "prepared" / "fake.h5") as f:
            test_voxels.append(f["splits/test/rois/V1"][()])
    assert outputs[0] == outputs[1]
    assert np.abs(test_voxels[0] - test_voxels[1]).min() == pytest.approx(5.0, rel=1e-4)


def test_ridge_matches_its_linear_module_and_ignores_test(tmp_path):
    blobs = []
    for shift in (0.0, 5.0):
        make_fake_data(tmp_path, test_shift=shift)
        m = fit.run(fit_config(tmp_path, **{"ridge-z": DECODERS["ridge-z"]}), "fake", "ridge-z")
        blobs.append((tmp_path / "models" / "fake" / "ridge-z.safetensors").read_bytes())
        # linear on a partly quadratic target: clearly above chance, below the networks
        assert 0.6 < m["identification"] < 0.9 and m["epochs_run"] == 1 and m["best_epoch"] == 0
    assert blobs[0] == blobs[1]


def test_bad_config_and_inputs(tmp_path, capsys):
    root = make_fake_data(tmp_path)
    config = fit_config(root)
    with pytest.raises(ConfigError, match="unknown decoder 'nope'"):
        decoder_config(config, "nope")
    with pytest.raises(ConfigError, match="do not apply to kind 'cnn'"):
        decoder_config(fit_config(root, bad=dict(DECODERS["cnn-z"], vae={})), "bad")
    with pytest.raises(ConfigError, match="kind"):
        decoder_config(fit_config(root, bad=dict(DECODERS["cnn-z"], kind="mlp")), "bad")
    with pytest.raises(ConfigError, match="lr: expected a number"):
        decoder_config(fit_config(root, bad=dict(DECODERS["cnn-z"], optim=dict(FAST_OPTIM, lr="fast"))), "bad")
    with pytest.raises(ValueError, match=r"unknown input ROI\(s\) \['V9'\]"):
        fit.run(fit_config(root, bad=dict(DECODERS["cnn-z"], input_rois=["V1", "V9"])), "fake", "bad")
    with pytest.raises(FileNotFoundError, match="prepared dataset not found"):
        fit.run(config, "missing", "cnn-z")
    with h5py.File(root / "prepared" / "fake.h5", "a") as f:
        f["splits/train/rois/V2"][3, 4] = np.nan
    with pytest.raises(ValueError, match="splits/train/rois/V2 contains NaN"):
        fit.run(config, "fake", "cnn-z")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"fit": {"prepared_dir": str(root / "prepared"), "decoders": DECODERS}}))
    assert main(["--params", str(params), "--dataset", "fake", "--decoder", "cnn-z"]) == 1
    assert "error:" in capsys.readouterr().err and not (root / "models").exists()


def test_bad_target_shape(tmp_path):
    root = make_fake_data(tmp_path)
    with h5py.File(root / "targets" / "fake.h5", "a") as f:
        del f["z"]
        f["z"] = np.zeros((10, 16), np.float32)
    with pytest.raises(ValueError, match=r"z has shape \(10, 16\); expected \(N, C, h, w\)"):
        fit.run(fit_config(root), "fake", "cnn-z")
    n_total = sum(N_IMAGES.values())
    with h5py.File(root / "targets" / "fake.h5", "a") as f:
        c = f["c"][()]
        del f["c"]
        f["c"] = np.concatenate([c, c[:3]])
    with pytest.raises(ValueError, match=f"c has {n_total + 3} rows but .* has {n_total} images"):
        fit.run(fit_config(root), "fake", "cnn-c")


def test_main_fits_from_a_params_file(tmp_path, capsys):
    root = make_fake_data(tmp_path)
    section = {"prepared_dir": str(root / "prepared"), "targets_dir": str(root / "targets"),
               "models_dir": str(root / "models"), "results_dir": str(root / "results" / "fit"),
               "threads": 1, "std_floor": 1e-6, "device": "cpu", "decoders": {"gcn-z": dict(DECODERS["gcn-z"], optim=dict(FAST_OPTIM, max_epochs=3))}}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"fit": section}))
    assert main(["--params", str(params), "--dataset", "fake", "--decoder", "gcn-z"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epochs_run"] == 3 and printed["decoder"] == "gcn-z"
    assert (root / "models" / "fake" / "gcn-z.safetensors").is_file()
    assert sorted(p.name for p in (root / "models" / "fake").iterdir()) == ["gcn-z.safetensors"]  # no temp files
