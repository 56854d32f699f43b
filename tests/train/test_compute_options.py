"""The compute stages' device and dtype options (train/compute_options.py): validation on CPU, runs on CUDA."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from brainldm.export import parity
from brainldm.train.reconstruction import reconstruct as rc
from brainldm.train.compute_options import stage_device_dtype, stage_dtype
from brainldm.train.config import config_to_dict, config_to_record, load_config
from brainldm.train.decoding import decode
from brainldm.train.decoding.decode import DecodeConfig
from brainldm.train.decoding.decode import main as decode_main
from tests.train.decoding.test_decode import decode_config
from tests.train.decoding.test_fit import fit_config, make_fake_data
from tests.train.reconstruction.test_reconstruct import _config as reconstruct_config
from tests.train.reconstruction.test_reconstruct import _write_inputs as write_reconstruct_inputs
from tests.tiny_models import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
COMPUTE_SECTIONS = {"decode": DecodeConfig, "reconstruct": rc.ReconstructConfig, "parity": parity.ParityConfig}
CPU = torch.device("cpu")


def test_device_and_dtype_values_map_to_torch():
    assert stage_device_dtype("reconstruct", "cpu", "float32") == (CPU, torch.float32)
    assert stage_device_dtype("parity", "auto", "float32")[0].type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert stage_dtype("reconstruct", "float32", CPU) is torch.float32
    assert stage_dtype("reconstruct", "float16", torch.device("cuda")) is torch.float16
    assert stage_dtype("parity", "bfloat16", torch.device("cuda")) is torch.bfloat16


@pytest.mark.parametrize("device, dtype, message", [
    ("gpu", "float32", r"^reconstruct\.device: got 'gpu', expected 'cpu', 'cuda' or 'auto'$"),
    ("cpu", "half", r"^reconstruct\.dtype: got 'half', expected one of \['float32', 'float16', 'bfloat16'\]$"),
    ("cpu", "float16", r"^reconstruct\.dtype: 'float16' needs a CUDA device, got device 'cpu'; on CPU use 'float32'$"),
    ("cpu", "bfloat16", r"^reconstruct\.dtype: 'bfloat16' needs a CUDA device"),
])
def test_bad_values_are_one_error_naming_the_key(device, dtype, message):
    with pytest.raises(ValueError, match=message):
        stage_device_dtype("reconstruct", device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA device")
def test_cuda_without_a_device_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"^parity\.device: 'cuda' requested but no CUDA device is available$"):
        stage_device_dtype("parity", "cuda", "float32")
    with pytest.raises(ValueError, match=r"^parity\.dtype: 'float16' needs a CUDA device, got device 'cpu'"):
        stage_device_dtype("parity", "auto", "float16")  # auto resolves to the CPU here


def test_params_yaml_defaults_are_the_dataclass_defaults_and_leave_the_records_unchanged():
    """params.yaml's compute sections run on CPU in float32, the dataclasses' defaults, which the records
    saved in outputs leave out: with them, every output is the bytes it was before the options existed."""
    for section, cls in COMPUTE_SECTIONS.items():
        cfg = load_config(cls, section, ROOT / "params.yaml")
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in ("device", "dtype")}
        assert {k: getattr(cfg, k) for k in defaults} == defaults and defaults["device"] == "cpu", section
        assert defaults.get("dtype", "float32") == "float32", section
        record = config_to_record(cfg)
        assert not set(defaults) & set(record) and record == {k: v for k, v in config_to_dict(cfg).items()
                                                              if k not in defaults}, section
        other = dataclasses.replace(cfg, device="cuda")
        assert config_to_record(other)["device"] == "cuda"  # a run elsewhere says so


def _write_params(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def _one_error_line(capsys, key: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_stages_refuse_half_precision_or_unknown_devices_with_one_line(tmp_path, capsys):
    model = tmp_path / "model"  # never read: the options are checked before any input
    rcfg = reconstruct_config(tmp_path, model)
    sections = {"reconstruct": config_to_dict(dataclasses.replace(rcfg, dtype="float16")),
                "decode": config_to_dict(DecodeConfig(results_dir=str(tmp_path / "decode"), device="gpu")),
                "parity": config_to_dict(parity.ParityConfig(results_dir=str(tmp_path / "parity"), dtype="bfloat16"))}
    params = _write_params(tmp_path / "params.yaml", sections)
    assert rc.main(["--params", str(params), "--dataset", "ds", "--pair", "ours"]) == 1
    _one_error_line(capsys, "reconstruct.dtype")
    assert not (tmp_path / "out").exists()
    assert decode_main(["--params", str(params), "--dataset", "ds", "--decoder", "x"]) == 1
    _one_error_line(capsys, "decode.device")
    assert parity.main(["--params", str(params), "--dataset", "ds", "--pair", "ours"]) == 1
    _one_error_line(capsys, "parity.dtype")
    assert not (tmp_path / "parity").exists()


# --- CUDA runs (tests/conftest.py skips them without a CUDA device) ------------------------------------------

def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


@pytest.mark.gpu
def test_decode_on_cuda_matches_cpu(tmp_path):
    from brainldm.train.decoding import fit

    root = make_fake_data(tmp_path)
    fit.run(fit_config(root), "fake", "cnn-z")
    preds = {}
    for device in ("cpu", "cuda"):
        cfg = dataclasses.replace(decode_config(root), results_dir=str(root / device), device=device)
        decode.run(cfg, "fake", "cnn-z")
        with h5py.File(root / device / "fake" / "cnn-z.h5", "r") as f:
            preds[device], recorded = f["pred"][()], json.loads(f.attrs["config"])
        assert recorded.get("device", "cpu") == device
    scale = float(np.abs(preds["cpu"]).max())
    np.testing.assert_allclose(preds["cuda"], preds["cpu"], rtol=0, atol=1e-3 * scale)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "ldm")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, psnr_min", [("float32", 35.0), ("float16", 20.0), ("bfloat16", 15.0)])
def test_reconstruct_on_cuda_is_close_to_cpu(tmp_path, tiny_model, dtype, psnr_min):
    write_reconstruct_inputs(tmp_path)
    cpu = rc.run(reconstruct_config(tmp_path, tiny_model, out_dir=str(tmp_path / "cpu")), "ds", "ours")
    cuda_cfg = reconstruct_config(tmp_path, tiny_model, out_dir=str(tmp_path / "cuda"), device="auto", dtype=dtype)
    cuda = rc.run(cuda_cfg, "ds", "ours")
    expected, got = _pngs(cpu), _pngs(cuda)
    assert got.shape == expected.shape and _psnr(got, expected) >= psnr_min
    recorded = json.loads((cuda / "config.json").read_text())["config"]
    assert recorded["device"] == "cuda" and recorded.get("dtype", "float32") == dtype  # auto resolved


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parity_with_a_cuda_reference_is_judged_by_psnr(tmp_path, dtype):
    from brainldm.export import export
    from tests.export.tiny_bundle import DATASET, PAIR, make_configs

    ecfg, rcfg = make_configs(tmp_path)
    export.run(ecfg, rcfg, DATASET, PAIR)
    cfg = parity.ParityConfig(prepared_dir=ecfg.prepared_dir, models_dir=ecfg.models_dir, bundles_dir=ecfg.out_dir,
                              results_dir=str(tmp_path / "results"), items=2, samples=1, batch_size=2,
                              device="cuda", dtype=dtype)
    m = parity.run(cfg, rcfg, DATASET, PAIR)
    assert m["tolerances"]["judged_by"] == "psnr" and m["passed"], m
    assert m["pred_z_max_abs"] <= 1e-3 and m["pred_c_max_abs"] <= 1e-3
    assert m["config"]["parity"]["device"] == "cuda" and m["config"]["parity"].get("dtype", "float32") == dtype
