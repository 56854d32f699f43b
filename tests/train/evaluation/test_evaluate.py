import csv
import dataclasses
import json
import re

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from brainldm.train.evaluation import attribute_classifier as ac
from brainldm.train.evaluation import evaluate as ev
from brainldm.train.evaluation import figures, floors, metrics
from brainldm.train.simulation import scenes
from brainldm.train.config import config_to_dict
from tests.tiny_models import save_tiny_pipeline

TEST_INDEX = np.array([7, 2, 5, 0, 9, 3])
TRAIN_INDEX = np.array([1, 4, 6, 8, 1, 4, 8])  # single trials: images repeat
N_IMAGES, SIZE, SAMPLES = 10, 32, 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny_pipeline(root / "ldm")
    torch.manual_seed(0)
    cfg = ac.AttributeClassifierConfig(image_size=16, channels=(8, 16), feature_dim=32, out=str(root / "acl.safetensors"))
    ac.save_classifier(ac._build(cfg), cfg, cfg.out)
    images = scenes.generate(N_IMAGES, 5, SIZE, 1)[0]
    return {"model": model, "classifier": cfg.out, "images": images}


def _write_prepared(root, images):
    path = root / "prepared" / "ds.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["splits/test/image_index"] = TEST_INDEX
        f["splits/test/session"] = -np.ones(len(TEST_INDEX), np.int64)
        f["splits/train/image_index"] = TRAIN_INDEX


def _write_pair(root, name, recon, skip=(), sizes=None):
    """recon (n, K, H, W, 3) uint8 -> a reconstruct-stage folder; skip: (item, sample) pairs left out."""
    folder = root / "recon" / "ds" / name
    folder.mkdir(parents=True)
    rows = []
    for i in range(recon.shape[0]):
        for s in range(recon.shape[1]):
            if (i, s) in skip:
                continue
            image = Image.fromarray(recon[i, s])
            if sizes and (i, s) in sizes:
                image = image.resize((sizes[(i, s)],) * 2)
            image.save(folder / f"item{i:04d}_s{s}.png")
            rows.append((i, int(TEST_INDEX[i]), s, f"item{i:04d}_s{s}.png"))
    with open(folder / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([ev.INDEX_COLUMNS, *rows])
    (folder / "config.json").write_text(json.dumps({"config": {"samples": recon.shape[1]}}))


def _setup(tmp_path, assets, **pair_kwargs):
    gt = assets["images"][TEST_INDEX]
    _write_prepared(tmp_path, assets["images"])
    same = np.repeat(gt[:, None], SAMPLES, axis=1)
    _write_pair(tmp_path, "same", same, **pair_kwargs)
    _write_pair(tmp_path, "shuffled", np.roll(same, 1, axis=0))
    return ev.EvaluateConfig(
        pairs=("same", "shuffled"), differences=(("same", "shuffled"),), prepared_dir=str(tmp_path / "prepared"), reconstruct_dir=str(tmp_path / "recon"),
        out_dir=str(tmp_path / "out"), model=str(assets["model"]), classifier=assets["classifier"], n_boot=200,
        grid_items=3, grid_dpi=100,
    )


def test_identical_and_shuffled(tmp_path, assets):
    cfg = _setup(tmp_path, assets)
    out = ev.run(cfg, "ds")
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(TEST_INDEX)
    same = [r for r in rows if r["pair"] == "same"]
    assert [int(r["image_index"]) for r in same] == TEST_INDEX.tolist()
    for column in ("pixcorr", "ssim", "ident_vae", "ident_classifier", "attr_kind", "attr_colour", "attr_count",
                   "attr_background"):
        assert all(float(r[column]) == pytest.approx(1.0, abs=1e-6) for r in same), column
    result = json.loads((out / "metrics.json").read_text())
    shuffled = result["pairs"]["shuffled"]
    assert shuffled["pixcorr"]["mean"] < 0.9
    # the shuffled prediction j equals ground truth j-1, which always beats the true pair: <= (n-2)/(n-1)
    assert shuffled["ident_vae"]["mean"] <= (len(TEST_INDEX) - 2) / (len(TEST_INDEX) - 1) + 1e-9
    assert shuffled["ident_classifier"]["mean"] < result["pairs"]["same"]["ident_classifier"]["mean"] == 1.0


def test_metrics_json_schema_and_grid(tmp_path, assets):
    cfg = _setup(tmp_path, assets)
    out = ev.run(cfg, "ds")
    result = json.loads((out / "metrics.json").read_text())
    assert set(result) == {"dataset", "pairs", "floors", "differences", "chance", "feature_spaces", "protocol", "config"}
    summary = result["pairs"]["same"]["ssim"]
    assert set(summary) == {"mean", "sem", "ci_low", "ci_high", "n", "level", "n_undefined"}
    assert summary["n"] == len(TEST_INDEX) and summary["level"] == 0.95
    assert result["chance"]["ident_vae"] == 0.5 and 0 < result["chance"]["attr_kind"] <= 1
    assert result["feature_spaces"]["alexnet2"] == "not computed: no local weights (set evaluate.feature_weights.alexnet2)"
    assert set(result["feature_spaces"]) == set(ev.MINDEYE_SPACES)
    protocol = result["protocol"]
    assert protocol["test_images"] == len(TEST_INDEX) and protocol["repeats_averaged"] is True
    assert protocol["samples_per_image"] == {"same": SAMPLES, "shuffled": SAMPLES}
    assert protocol["ground_truth_resolution"] == SIZE
    assert result["config"]["pairs"] == ["same", "shuffled"]
    # grid: stimulus + 2 pairs x 2 samples, 3 rows
    header = int(round(figures.HEADER_LINES * 11.0 * 100 / figures.POINTS_PER_INCH))
    _, width, height = figures.grid_layout(3, [1, SAMPLES, SAMPLES], 128, 4, 16, header)
    assert Image.open(out / "grid.png").size == (width, height)


def test_missing_items_named(tmp_path, assets):
    cfg = _setup(tmp_path, assets, skip={(3, 1), (4, 0)})
    with pytest.raises(ev.EvaluateError, match=r"test items \[3, 4\] lack some of the 2 samples"):
        ev.run(cfg, "ds")
    assert not (tmp_path / "out").exists()


def test_mixed_sizes_rejected(tmp_path, assets):
    cfg = _setup(tmp_path, assets, sizes={(2, 0): 24})
    with pytest.raises(ev.EvaluateError, match="different sizes"):
        ev.run(cfg, "ds")


def test_feature_weights_read_locally_with_clear_errors(tmp_path, assets):
    cfg = _setup(tmp_path, assets)
    empty = tmp_path / "alexnet.pth"
    empty.write_bytes(b"")
    given = dataclasses.replace(cfg, feature_weights={**cfg.feature_weights, "alexnet2": str(empty)})
    with pytest.raises(ValueError, match=r"alexnet\.pth: cannot be read as torchvision alexnet weights"):
        ev.run(given, "ds")
    # CLIP is read from a local Hugging Face folder only; a file is not one
    clip = dataclasses.replace(cfg, feature_weights={**cfg.feature_weights, "clip_vitl14": str(empty)})
    with pytest.raises(FileNotFoundError, match=r"has no config\.json; expected a local folder"):
        ev.run(clip, "ds")
    assert not (tmp_path / "out").exists()
    bad = dataclasses.replace(cfg, feature_weights={"resnet": None})
    with pytest.raises(ev.EvaluateError, match="unknown space"):
        ev.run(bad, "ds")


def test_main_errors(tmp_path, assets, capsys):
    cfg = _setup(tmp_path, assets)
    params = tmp_path / "params.yaml"
    section = dict(config_to_dict(cfg), reconstruct_dir=str(tmp_path / "nowhere"))
    params.write_text(json.dumps({"evaluate": section}))
    assert ev.main(["--params", str(params), "--dataset", "ds"]) == 1
    assert "index.csv" in capsys.readouterr().err


def test_reconstructions_of_another_split_rejected(tmp_path, assets):
    cfg = _setup(tmp_path, assets)
    index = tmp_path / "recon" / "ds" / "same" / "index.csv"
    lines = index.read_text().splitlines()
    lines[1] = lines[1].replace(f"0,{TEST_INDEX[0]},0", "0,8,0")
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(ev.EvaluateError, match=r"test items \[0\] have an image_index"):
        ev.run(cfg, "ds")
    lines[1] = lines[1].replace("0,8,0", f"0,{TEST_INDEX[0]},0")
    index.write_text("\n".join([*lines, "6,8,0,item0000_s0.png"]) + "\n")
    with pytest.raises(ev.EvaluateError, match=r"test items \[6\].*outside"):
        ev.run(cfg, "ds")


def test_floors_are_computed_from_the_stimuli_and_the_training_images(tmp_path, assets):
    cfg = _setup(tmp_path, assets)
    result = json.loads((ev.run(cfg, "ds") / "metrics.json").read_text())
    images, gt = assets["images"], assets["images"][TEST_INDEX]
    perm = floors.derangement(len(TEST_INDEX), cfg.seed)
    assert sorted(perm.tolist()) == list(range(len(TEST_INDEX))) and not np.any(perm == np.arange(len(TEST_INDEX)))
    # the mean over the UNIQUE training images (1, 4, 6, 8), not over trials, and no test image in it
    mean = np.rint(images[[1, 4, 6, 8]].astype(np.float64).mean(axis=0)).astype(np.uint8)
    np.testing.assert_array_equal(floors.mean_train_image(tmp_path / "prepared" / "ds.h5"), mean)
    for name, recon in {"shuffled_stimuli": gt[perm], "mean_train_image": np.broadcast_to(mean, gt.shape)}.items():
        expected = metrics.ssim(gt, recon)
        assert result["floors"][name]["ssim"]["mean"] == pytest.approx(float(np.mean(expected)), abs=1e-9), name
        assert result["floors"][name]["pixcorr"]["n"] == len(TEST_INDEX)
    # a picture of another stimulus never identifies its own image better than the true pair
    assert result["floors"]["shuffled_stimuli"]["ident_vae"]["mean"] < 1.0


def test_paired_difference_is_the_per_image_difference(tmp_path, assets):
    cfg = _setup(tmp_path, assets)
    out = ev.run(cfg, "ds")
    result = json.loads((out / "metrics.json").read_text())
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {pair: np.array([float(r["ssim"]) for r in rows if r["pair"] == pair]) for pair in ("same", "shuffled")}
    diff = result["differences"]["same-shuffled"]["ssim"]
    assert diff["mean"] == pytest.approx(float(np.mean(by["same"] - by["shuffled"])), abs=1e-12)
    assert diff["ci_low"] > 0 and diff["n"] == len(TEST_INDEX)
    # paired: the CI of the mean difference is the bootstrap of the differences, not of two independent means
    expected = metrics.summarise(by["same"] - by["shuffled"], cfg.n_boot, cfg.ci_level, cfg.seed)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high), abs=1e-12)


@pytest.mark.parametrize("differences, message", [((("same", "nope"),), "pair(s) ['nope'] are not in evaluate.pairs"),
                                                  ((("same",),), "expected pairs of names [a, b]")])
def test_differences_must_name_two_evaluated_pairs(tmp_path, assets, differences, message):
    cfg = dataclasses.replace(_setup(tmp_path, assets), differences=differences)
    with pytest.raises(ev.EvaluateError, match=re.escape(message)):
        ev.run(cfg, "ds")
