import json
import re

import h5py
import numpy as np
import pytest
import yaml

from brainldm.train.data import nsd, prepare
from brainldm.train.config import from_dict
from tests.train.fixtures import build_nsd, build_things, write_hdf5_session, write_things_responses

NSD_ROIS = {
    "V1": {"atlas": "prf-visualrois", "labels": ["V1v", "V1d"]},
    "V2": {"atlas": "prf-visualrois", "labels": ["V2v", "V2d"]},
    "V3": {"atlas": "prf-visualrois", "labels": ["V3v", "V3d"]},
    "hV4": {"atlas": "prf-visualrois", "labels": ["hV4"]},
}
THINGS_ROIS = {"V1": {"columns": ["V1"]}, "V2": {"columns": ["V2"]}, "V3": {"columns": ["V3"]},
               "hV4": {"columns": ["hV4"]}, "FFA": {"columns": ["lFFA", "rFFA"]}}
PER_SESSION = 8


def params(tmp_path, nsd_root=None, things_root=None, out="out", **kw) -> dict:
    datasets = {}
    if nsd_root is not None:
        datasets["n"] = {"source": "nsd", "root": str(nsd_root), "subject": 1, "rois": NSD_ROIS, "betas_format": "hdf5"}
    if things_root is not None:
        datasets["t"] = {"source": "things", "root": str(things_root), "subject": 1, "rois": THINGS_ROIS,
                         "image_size": 8}
    graph = {"nodes": [["V1"], ["V2"], ["V3", "hV4"]], "threshold": 0.0, "weight_mode": "abs", "self_loops": False}
    return {"datasets": datasets, "val_fraction": 0.25, "seed": 3, "output_dir": str(tmp_path / out), "graph": graph,
            **kw}


def run(tmp_path, name, **kw):
    return prepare.run(from_dict(prepare.PrepareConfig, params(tmp_path, **kw)), name)


def read_all(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        out["pad_length"] = f["graph"].attrs["pad_length"]
    return out


def rewrite_nsd(fx, trial_mask, delta):
    betas = fx.betas.copy()
    betas[trial_mask] = np.clip(betas[trial_mask].astype(np.int32) + delta, -32768, 32767).astype(np.int16)
    for k in range(len(fx.trials_per_session)):
        write_hdf5_session(fx.root, 1, k + 1, betas[k * PER_SESSION : (k + 1) * PER_SESSION])


@pytest.fixture()
def nsd_fx(tmp_path):
    return build_nsd(tmp_path / "nsd", per_session=PER_SESSION)


def test_normalisation_and_splits_exact(tmp_path, nsd_fx):
    path = run(tmp_path, "n", nsd_root=nsd_fx.root)
    raw = nsd.load(from_dict(prepare.DatasetConfig, params(tmp_path, nsd_fx.root)["datasets"]["n"]))
    f = read_all(path)
    test_rows, val_rows = f["splits/test/image_index"], f["splits/val/image_index"]
    assert f["image_ids"][test_rows].tolist() == sorted(nsd_fx.shared.tolist())
    assert len(val_rows) == round(0.25 * 9) and not set(val_rows) & set(test_rows)
    train_trials = np.flatnonzero(~np.isin(raw.trial_image, np.concatenate([val_rows, test_rows])))
    assert f["splits/train/image_index"].tolist() == raw.trial_image[train_trials].tolist()
    mean = np.stack([raw.betas[train_trials[raw.trial_session[train_trials] == s]].mean(0) for s in (1, 2, 3)])
    std = np.stack([raw.betas[train_trials[raw.trial_session[train_trials] == s]].std(0) for s in (1, 2, 3)])
    np.testing.assert_allclose(f["norm/mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f["norm/std"], std, rtol=1e-5)
    z = (raw.betas - mean[raw.trial_session - 1]) / std[raw.trial_session - 1]
    cols = f["rois/V2/columns"]
    np.testing.assert_allclose(f["splits/train/rois/V2"], z[train_trials][:, cols], rtol=1e-5, atol=1e-5)
    for k, row in enumerate(test_rows):
        expected = z[raw.trial_image == row][:, cols].mean(0)
        np.testing.assert_allclose(f["splits/test/rois/V2"][k], expected, rtol=1e-5, atol=1e-5)
    assert f["norm/voxel_ids"][cols].tolist() == f["rois/V2/voxel_ids"].tolist()


def test_schema_fields(tmp_path, nsd_fx):
    f = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root))
    with h5py.File(tmp_path / "out/n.h5") as h:
        assert h.attrs["format_version"] == 1 and h.attrs["source"] == "nsd" and h.attrs["subject"] == "subj01"
        assert json.loads(h.attrs["config"])["datasets"]["n"]["rois"]["V1"]["labels"] == ["V1v", "V1d"]
    assert f["images"].dtype == np.uint8 and f["images"].shape == (12, 6, 5, 3)
    assert json.loads(f["captions"][0]) == nsd_fx.captions[int(f["image_ids"][0])]
    assert f["image_names"][0].decode() == f"nsd-{f['image_ids'][0]}"
    assert json.loads(f["graph/node_rois"]) == [["V1"], ["V2"], ["V3", "hV4"]]
    assert f["pad_length"] == 4 and f["graph/edge_index"].shape == (2, 6)
    assert set(f["splits/val/session"].tolist()) <= {-1, 1, 2, 3}


def test_leak_free_against_test_and_val_perturbation(tmp_path, nsd_fx):
    base = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root, out="a"))
    frozen = ["splits/train/rois/V1", "splits/train/rois/hV4", "splits/train/image_index", "norm/mean",
              "norm/std", "graph/edge_index", "graph/edge_weight"]
    for split in ("test", "val"):
        rows = base[f"splits/{split}/image_index"]
        rewrite_nsd(nsd_fx, np.isin(nsd_fx.trial_ids, base["image_ids"][rows]), delta=1234)
        changed = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root, out=split))
        for key in frozen:
            np.testing.assert_array_equal(changed[key], base[key], err_msg=f"{split} perturbation reached {key}")
        assert not np.array_equal(changed[f"splits/{split}/rois/V1"], base[f"splits/{split}/rois/V1"])
        rewrite_nsd(nsd_fx, np.zeros(len(nsd_fx.trial_ids), bool), delta=0)


def test_things_leak_free_and_roi_union(tmp_path):
    fx = build_things(tmp_path / "things")
    base = read_all(run(tmp_path, "t", things_root=fx.root, out="a"))
    betas = fx.betas.copy()
    betas[(fx.table.trial_type == "test").to_numpy()] += 5.0
    write_things_responses(fx.root, 1, fx.voxel_ids, betas)
    changed = read_all(run(tmp_path, "t", things_root=fx.root, out="b"))
    for key in ("splits/train/rois/FFA", "norm/mean", "norm/std", "graph/edge_weight"):
        np.testing.assert_array_equal(changed[key], base[key])
    assert not np.array_equal(changed["splits/test/rois/FFA"], base["splits/test/rois/FFA"])
    assert base["rois/FFA/voxel_ids"].tolist() == fx.voxel_ids[[6, 7, 8]].tolist()
    assert base["splits/test/session"].tolist() == [-1, -1]


def test_deterministic(tmp_path, nsd_fx):
    a = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root, out="a"))
    b = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root, out="b"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    c = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root, out="c", seed=11))
    assert not np.array_equal(a["splits/val/image_index"], c["splits/val/image_index"])


def test_zero_std_guard(tmp_path, nsd_fx):
    betas = nsd_fx.betas[:PER_SESSION].copy()
    betas[:, 0, 0, 0] = 77  # V1v voxel constant in session 1
    write_hdf5_session(nsd_fx.root, 1, 1, betas)
    f = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root))
    col = int(np.searchsorted(f["norm/voxel_ids"], 0))
    assert f["norm/std"][0, col] == 1.0 and f["norm/mean"][0, col] == pytest.approx(77 / 300)
    v1 = f["rois/V1/voxel_ids"].tolist().index(0)
    assert np.all(f["splits/train/rois/V1"][f["splits/train/session"] == 1, v1] == 0)
    assert all(np.isfinite(f[k]).all() for k in f if k.startswith("splits/") and "/rois/" in k)


def _write_params(tmp_path, nsd_root, **kw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": params(tmp_path, nsd_root, **kw)}))
    return str(path)


def test_main_writes_output(tmp_path, nsd_fx, capsys):
    assert prepare.main(["--dataset", "n", "--params", _write_params(tmp_path, nsd_fx.root)]) == 0
    assert (tmp_path / "out/n.h5").is_file()


@pytest.mark.parametrize("case, message", [
    ("sessions", r"betas_session04\.hdf5"),
    ("nan", r"betas_session02\.hdf5: 1 non-finite"),
    ("empty_roi", "zero voxels"),
    ("unknown_node", r"graph\.nodes\[2\]: unknown ROI"),
    ("dataset", "'zz' not in prepare.datasets"),
])
def test_main_bad_input_writes_nothing(tmp_path, nsd_fx, capsys, case, message):
    kw, name = {}, "n"
    if case == "sessions":
        kw = {"datasets": {"n": {"source": "nsd", "root": str(nsd_fx.root), "subject": 1, "rois": NSD_ROIS,
                                 "sessions": 4, "betas_format": "hdf5"}}}
    elif case == "nan":
        write_hdf5_session(nsd_fx.root, 1, 2, nsd_fx.betas[8:16])
        with h5py.File(nsd_fx.root / nsd.BETAS_DIR.format(subj="subj01") / "betas_session02.hdf5", "r+") as h:
            data = h["betas"][()].astype(np.float32)
            data[1, 0, 0, 0] = np.nan
            del h["betas"]
            h["betas"] = data
    elif case == "empty_roi":
        kw = {"datasets": {"n": {"source": "nsd", "root": str(nsd_fx.root), "subject": 1,
                                 "rois": {**NSD_ROIS, "X": {"atlas": "prf-visualrois", "labels": [11]}}}}}
    elif case == "unknown_node":
        kw = {"graph": {"nodes": [["V1"], ["V2"], ["V4"]], "threshold": 0.0, "weight_mode": "abs", "self_loops": False}}
    else:
        name = "zz"
    code = prepare.main(["--dataset", name, "--params", _write_params(tmp_path, nsd_fx.root, **kw)])
    err = capsys.readouterr().err
    assert code != 0 and "error: " in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_roi_spec_must_fit_the_source(tmp_path, nsd_fx):
    ds = params(tmp_path, nsd_fx.root)["datasets"]["n"]
    ds["rois"] = {"V1": {"columns": ["V1"]}}
    with pytest.raises(ValueError, match=r"ROI 'V1': a nsd ROI is given by atlas \+ labels"):
        prepare.load_raw(from_dict(prepare.DatasetConfig, ds))


def test_raw_test_trials_reproduce_the_test_split(tmp_path, nsd_fx):
    """The runtime's path (raw betas -> session z-score -> average repeats) gives the test split."""
    f = read_all(run(tmp_path, "n", nsd_root=nsd_fx.root))
    sessions = f["norm/sessions"].tolist()
    rows = [sessions.index(s) for s in f["raw_test/session"]]
    z = (f["raw_test/betas"] - f["norm/mean"][rows]) / f["norm/std"][rows]
    cols = f["rois/V1/columns"]
    for k, image in enumerate(f["splits/test/image_index"]):
        expected = z[f["raw_test/image_index"] == image][:, cols].mean(axis=0)
        np.testing.assert_allclose(f["splits/test/rois/V1"][k], expected, rtol=1e-5, atol=1e-5)
    assert set(f["raw_test/image_index"].tolist()) == set(f["splits/test/image_index"].tolist())
