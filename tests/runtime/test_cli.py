import csv
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from brainldm.runtime import cli
from tests.export.tiny_bundle import TEST_IMAGES, build_tiny_bundle, raw_test


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("cli"))


def _args(bundle_dir, betas, out, *extra):
    return ["reconstruct", "--bundle", str(bundle_dir), "--betas", str(betas), "--out", str(out), "--threads", "1",
            *extra]


def test_npz_input_writes_pngs_index_and_refuses_to_overwrite(bundle_dir, tmp_path, capsys):
    raw = raw_test()
    np.savez(tmp_path / "in.npz", betas=raw["betas"], session=raw["session"], group=raw["image_index"])
    out = tmp_path / "out"
    assert cli.main(_args(bundle_dir, tmp_path / "in.npz", out, "--samples", "2", "--batch-size", "3")) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"item{i:04d}_s{s}.png" for i in range(len(TEST_IMAGES)) for s in range(2)]
    assert np.asarray(Image.open(out / pngs[0])).shape == (16, 16, 3)
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert [int(r["group"]) for r in rows[::2]] == list(TEST_IMAGES)
    assert not list(out.glob(".*"))  # no temporary files left
    first = np.asarray(Image.open(out / pngs[0]))
    assert cli.main(_args(bundle_dir, tmp_path / "in.npz", out)) == 1
    assert "already holds results" in capsys.readouterr().err
    assert cli.main(_args(bundle_dir, tmp_path / "in.npz", out, "--samples", "1", "--overwrite")) == 0
    assert len(list(out.glob("*.png"))) == len(TEST_IMAGES)
    np.testing.assert_array_equal(np.asarray(Image.open(out / pngs[0])), first)


def test_h5_input_matches_npz(bundle_dir, tmp_path):
    raw = raw_test()
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["betas"], f["session"], f["group"] = raw["betas"], raw["session"], raw["image_index"]
    np.savez(tmp_path / "in.npz", betas=raw["betas"], session=raw["session"], group=raw["image_index"])
    for name in ("in.h5", "in.npz"):
        assert cli.main(_args(bundle_dir, tmp_path / name, tmp_path / name.replace(".", "_"), "--samples", "1")) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "item0002_s0.png")) for d in ("in_h5", "in_npz"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p / "x.npy", raw_test()["betas"]), "session is required"),
    (lambda p: np.save(p / "x.npy", np.full((2, 30), np.nan, np.float32)), "60 NaN/Inf values"),
    (lambda p: np.save(p / "x.npy", raw_test()["betas"][:, :5]), r"shape \(8, 5\); expected \(n_trials, 30\)"),
    (lambda p: np.savez(p / "x.npz", other=np.zeros(3)), "has no 'betas' array"),
    (lambda p: (p / "x.txt").write_text("1 2 3"), "unsupported input type '.txt'"),
    (lambda p: None, "betas file not found"),
])
def test_bad_input_exits_non_zero_with_error(bundle_dir, tmp_path, capsys, make, message):
    make(tmp_path)
    files = [p for p in tmp_path.glob("x.*")]
    betas = files[0] if files else tmp_path / "x.npy"
    assert cli.main(_args(bundle_dir, betas, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()  # inputs are checked before the output folder is made


def test_usage_errors_exit_2(bundle_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(_args(bundle_dir, tmp_path / "x.npy", tmp_path / "o", "--backend", "cuda"))
    assert exc.value.code == 2


@pytest.mark.parametrize("name, message", [
    ("x.npy", "could not read"),
    ("x.npz", "could not read"),
    ("x.h5", "could not read"),
])
def test_empty_files_are_refused(bundle_dir, tmp_path, capsys, name, message):
    (tmp_path / name).write_bytes(b"")
    assert cli.main(_args(bundle_dir, tmp_path / name, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and name in err, err
    assert not (tmp_path / "out").exists()


def test_zero_trials_are_refused(bundle_dir, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", betas=np.zeros((0, raw_test()["betas"].shape[1]), np.float32))
    assert cli.main(_args(bundle_dir, tmp_path / "x.npz", tmp_path / "out")) == 1
    assert "0 trials" in capsys.readouterr().err


def test_batch_failing_midway_leaves_only_complete_pngs(bundle_dir, tmp_path, capsys, monkeypatch):
    raw = raw_test()
    np.savez(tmp_path / "in.npz", betas=raw["betas"], session=raw["session"], group=raw["image_index"])
    real = cli.Reconstructor.iter_batches

    def fail_on_second_batch(self, *args, **kwargs):
        batches = real(self, *args, **kwargs)
        yield next(batches)
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(cli.Reconstructor, "iter_batches", fail_on_second_batch)
    out = tmp_path / "out"
    assert cli.main(_args(bundle_dir, tmp_path / "in.npz", out, "--samples", "2", "--batch-size", "3")) == 1
    err = capsys.readouterr().err
    assert "failed after 3 of" in err and "simulated device failure" in err, err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and not (out / "index.csv").exists() and not list(out.glob(".*"))
    for png in pngs:  # every written file decodes completely
        assert np.asarray(Image.open(png)).shape == (16, 16, 3)
