"""Every user error of ``brainldm-runtime reconstruct``: exit 1 with one line naming what was
wrong and what was expected, nothing written, the output folder as it was."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from brainldm.runtime import bundle_format as bf
from brainldm.runtime import cli
from brainldm.runtime import preprocess as pp
from tests.export.tiny_bundle import build_tiny_bundle, raw_test


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("cli-errors"))


def _args(bundle, betas, out, *extra):
    return ["reconstruct", "--bundle", str(bundle), "--betas", str(betas), "--out", str(out), "--threads", "1",
            "--samples", "1", *extra]


def _save(tmp_path, betas=None, **fields):
    raw = raw_test()
    data = {"betas": raw["betas"] if betas is None else betas, "session": raw["session"],
            "group": raw["image_index"], **fields}
    np.savez(tmp_path / "in.npz", **data)
    return tmp_path / "in.npz"


def _one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    return err


@pytest.mark.parametrize("make_betas, pattern", [
    # NSD's own files: int16 percent signal change x 300
    (lambda b: np.rint(b * 300).astype(np.int16), r"integer dtype int16.*divide by 300"),
    # the same values cast to float without the division
    (lambda b: b * 300, r"not on the scale.*8 of 8 trials.*at most 50"),
    (lambda b: b.astype(np.complex64), "dtype complex64; expected a float array"),
    (lambda b: b > 5, "dtype bool; expected a float array"),
    (lambda b: b[:, :, None], r"shape \(8, 30, 1\); expected \(n_trials, 30\)"),
    (lambda b: b[0], r"shape \(30,\); expected \(n_trials, 30\)"),
])
def test_betas_no_response_can_be_are_refused(bundle_dir, tmp_path, capsys, make_betas, pattern):
    betas = make_betas(raw_test()["betas"])
    assert cli.main(_args(bundle_dir, _save(tmp_path, betas), tmp_path / "out")) == 1
    _one_line_error(capsys, pattern)
    assert not (tmp_path / "out").exists()


def test_the_scale_limit_lies_between_real_responses_and_the_wrong_unit():
    """Not vacuous on either side: z-scored responses pass with a wide margin; x300 fails."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((64, 500)) * 3  # a very noisy trial set: rms 3
    pp.check_scale(z)
    unit = z[7] / np.sqrt(np.mean(z[7] ** 2))
    z[7] = unit * pp.MAX_TRIAL_RMS_Z * 0.99  # one trial just inside the limit
    pp.check_scale(z)
    z[7] = unit * pp.MAX_TRIAL_RMS_Z * 1.01  # and just beyond it
    with pytest.raises(pp.InputError, match=r"1 of 64 trials.*rows \[7\]"):
        pp.check_scale(z)


@pytest.mark.parametrize("save, pattern", [
    (lambda p: np.save(p / "x.npy", np.array([{"betas": 1}], dtype=object), allow_pickle=True), "could not read"),
    (lambda p: np.savez(p / "x.npz", betas=np.array([[1.0], "a"], dtype=object)), "could not read"),
    (lambda p: (p / "x.h5").write_bytes(b"\x89HDF not really"), "could not read"),
])
def test_pickled_or_damaged_files_are_refused(bundle_dir, tmp_path, capsys, save, pattern):
    save(tmp_path)
    betas = next(tmp_path.glob("x.*"))
    assert cli.main(_args(bundle_dir, betas, tmp_path / "out")) == 1
    _one_line_error(capsys, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [
    ("--seed", "-1"), ("--threads", "-2"), ("--batch-size", "0"), ("--samples", "-3"), ("--seed", "1.5"),
    ("--actor-cpus", "nan"),
])
def test_out_of_range_options_are_usage_errors(bundle_dir, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(_args(bundle_dir, _save(tmp_path), tmp_path / "out", "--ray", option, value))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and value in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_below_one_is_refused(bundle_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("keep me")
    for out, pattern in [(tmp_path / "taken", "is a file; expected a folder"),
                         (tmp_path / "taken" / "sub", "taken is a file, so no folder can be made below it")]:
        assert cli.main(_args(bundle_dir, _save(tmp_path), out)) == 1
        _one_line_error(capsys, pattern)
    assert (tmp_path / "taken").read_text() == "keep me"


def test_out_inside_the_bundle_is_refused(bundle_dir, tmp_path, capsys):
    bundle = shutil.copytree(bundle_dir, tmp_path / "b")
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    for out in (bundle, bundle / "recon"):
        assert cli.main(_args(bundle, _save(tmp_path), out)) == 1
        _one_line_error(capsys, "is inside the bundle")
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_out_without_write_permission_is_refused(bundle_dir, tmp_path, capsys, monkeypatch):
    # root may write anywhere, so the permission is denied through os.access, as a user sees it
    monkeypatch.setattr(cli.os, "access", lambda path, mode: os.fspath(path) != os.fspath(tmp_path))
    assert cli.main(_args(bundle_dir, _save(tmp_path), tmp_path / "out")) == 1
    _one_line_error(capsys, f"no permission to write in {re.escape(str(tmp_path))}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, pattern", [
    (lambda m: m["generation"].pop("guidance"), r"manifest field 'generation\.guidance' is missing"),
    (lambda m: m["generation"].update(steps="50"), r"generation\.steps"),
    (lambda m: m.pop("files"), "'files' is missing"),
])
def test_a_manifest_with_a_missing_or_mistyped_field_is_one_line(bundle_dir, tmp_path, capsys, change, pattern):
    bundle = shutil.copytree(bundle_dir, tmp_path / "b")
    manifest = json.loads((bundle / bf.MANIFEST).read_text())
    change(manifest)
    (bundle / bf.MANIFEST).write_text(json.dumps(manifest))
    assert cli.main(_args(bundle, _save(tmp_path), tmp_path / "out")) == 1
    _one_line_error(capsys, pattern)
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_is_not_utf8_is_named(bundle_dir, tmp_path, capsys):
    bundle = shutil.copytree(bundle_dir, tmp_path / "b")
    (bundle / bf.MANIFEST).write_bytes(b"\xff\xfe{}")
    assert cli.main(_args(bundle, _save(tmp_path), tmp_path / "out")) == 1
    _one_line_error(capsys, r"manifest\.json: not valid UTF-8 JSON")


def test_an_interrupted_run_keeps_complete_pngs_and_writes_no_index(bundle_dir, tmp_path, capsys, monkeypatch):
    real = cli.Reconstructor.generate
    calls = []

    def interrupted_in_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cli.Reconstructor, "generate", interrupted_in_the_second_batch)
    out = tmp_path / "out"
    assert cli.main(_args(bundle_dir, _save(tmp_path), out, "--batch-size", "2")) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.endswith("no index.csv was written\n") and err.splitlines()[-1].startswith("interrupted: "), err
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and not (out / "index.csv").exists() and not list(out.glob(".*"))
    assert all(np.asarray(Image.open(p)).shape == (16, 16, 3) for p in pngs)
