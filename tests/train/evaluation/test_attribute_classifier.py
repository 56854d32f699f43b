import json

import numpy as np
import pytest
import torch

from brainldm.train.evaluation import attribute_classifier as ac
from brainldm.train.simulation import scenes

QUICK = dict(image_size=32, n_train=600, n_val=200, epochs=5, batch_size=32, learning_rate=3e-3,
             channels=(8, 16), pooled_size=4, feature_dim=32, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("acl")
    cfg = ac.AttributeClassifierConfig(**QUICK, out=str(root / "m.safetensors"), metrics=str(root / "m.json"))
    metrics = ac.run(cfg)
    return cfg, metrics


def test_learns_well_above_chance(trained):
    cfg, metrics = trained
    acc, chance = metrics["val_accuracy"], metrics["val_chance"]
    assert set(acc) == set(ac.ATTRIBUTES)
    assert acc["background"] >= 0.8 > chance["background"] + 0.3
    assert acc["colour"] >= chance["colour"] + 0.15
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert json.loads(open(cfg.metrics).read())["val_accuracy"] == acc


def test_save_load_roundtrip_and_api(trained):
    cfg, _ = trained
    model = ac.load_classifier(cfg.out)
    assert model.config == cfg
    images, _, attrs, _ = scenes.generate(12, 999, 32, 1)
    feats = ac.features(model, images)
    assert feats.shape == (12, cfg.feature_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(ac.features(model, images, batch_size=5), feats, rtol=1e-5, atol=1e-5)
    pred = ac.predict_attributes(model, images)
    assert {k: v.dtype for k, v in pred.items()} == {k: np.dtype(np.int64) for k in ac.ATTRIBUTES}
    assert pred["count"].min() >= 1 and pred["count"].max() <= cfg.max_objects  # same coding as scenes.attributes
    # another size is resized to the model's input size
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    assert ac.features(model, big).shape == (12, cfg.feature_dim)


def test_file_bytes_do_not_depend_on_hash_order(trained):
    # safetensors writes metadata keys in a per-process random order; the model file of one
    # run differed from the next (same weights) until the metadata became a single key
    from safetensors import safe_open
    cfg, _ = trained
    with safe_open(str(cfg.out), framework="pt") as f:
        assert list(f.metadata()) == [ac.METADATA_KEY]


def test_deterministic_training():
    cfg = ac.AttributeClassifierConfig(**{**QUICK, "n_train": 64, "n_val": 16, "epochs": 1})
    a, ma = ac.train(cfg)
    b, mb = ac.train(cfg)
    assert ma == mb
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="attribute classifier not found"):
        ac.load_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an attribute classifier"):
        ac.load_classifier(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="uint8"):
        ac.to_input(np.zeros((2, 8, 8, 3), np.float32), 8)


def test_main_reports_errors(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("attribute_classifier:\n  n_train: 0\n")
    assert ac.main(["--params", str(params)]) == 1
    assert "error:" in capsys.readouterr().err
