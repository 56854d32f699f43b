import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from brainldm.export import export as ex
from brainldm.runtime import bundle_format as bf
from brainldm.runtime.ddim import DDIMScheduler
from brainldm.train.config import ConfigError, config_to_dict
from tests.export.tiny_bundle import DATASET, N_VOXELS, PAIR, ROIS, SESSIONS, make_configs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ecfg, rc = make_configs(root)
    return root, ecfg, rc, ex.run(ecfg, rc, DATASET, PAIR)


def test_bundle_holds_checked_graphs_arrays_and_hashes(built):
    root, ecfg, rc, bundle = built
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format_version"] == bf.FORMAT_VERSION and m["dataset"] == DATASET and m["pair"] == PAIR
    assert sorted(m["models"]) == sorted(bf.MODEL_NAMES)
    checks = json.loads((Path(ecfg.checks_dir) / f"{DATASET}-{PAIR}.json").read_text())["graphs"]
    assert sorted(checks) == sorted(bf.MODEL_NAMES)
    for name, check in checks.items():
        assert 0 < max(check["max_abs"].values()) <= check["atol"] <= 3e-4
        assert "max_abs" not in json.dumps(m["models"][name])  # processor-dependent numbers stay out of the bundle
    assert m["models"]["unet"]["inputs"][0]["shape"][0] == "batch"
    assert [i["name"] for i in m["models"]["unet"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert m["models"]["unet"]["inputs"][0]["shape"][1:] == [4, 4, 4]  # fixed at the generation size
    # the VAE decoder decodes predicted z and generated latents, whose sizes may differ
    assert m["models"]["vae_decoder"]["inputs"][0]["shape"] == ["batch", 4, "latents_height", "latents_width"]
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [f for f in files if f != "manifest.json"]
    assert all(bf.file_sha256(bundle / f) == h for f, h in m["files"].items())
    assert m["input"]["n_voxels"] == N_VOXELS and m["input"]["sessions"] == list(SESSIONS)
    assert m["image_model"]["latent_shape"] == [4, 4, 4] and m["image_model"]["resolution"] == 16
    assert m["generation"] == {"steps": 10, "strength": 0.8, "guidance": 5.0, "samples": 2, "seed": 42,
                               "encode_mode": "sample"}
    assert m["graph"]["node_rois"] == [["A"], ["B"], ["C"]] and m["graph"]["pad_length"] == 10
    np.testing.assert_array_equal(np.load(bundle / m["decoders"]["z"]["columns"]), ROIS["A"] + ROIS["B"] + ROIS["C"])
    np.testing.assert_array_equal(np.load(bundle / m["decoders"]["c"]["columns"]), ROIS["B"] + ROIS["C"])
    with h5py.File(root / "prepared" / f"{DATASET}.h5") as f:
        np.testing.assert_array_equal(np.load(bundle / m["normalisation"]["std"]), f["norm/std"][()])
    assert not list(bundle.parent.glob(".*"))  # no temporary leftovers


def test_manifest_scheduler_drives_the_numpy_ddim(built):
    _, _, rc, bundle = built
    m = json.loads((bundle / "manifest.json").read_text())
    from brainldm.train.reconstruction.reconstruct import load_reference_pipeline

    sched = DDIMScheduler.from_config(m["scheduler"]["config"])
    alphas = np.load(bundle / m["scheduler"]["alphas_cumprod"])
    np.testing.assert_array_equal(alphas, load_reference_pipeline(rc.model).scheduler.alphas_cumprod.numpy())
    sched.set_alphas_cumprod(alphas)
    assert sched.set_timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_failed_parity_check_writes_nothing(built):
    root, ecfg, rc, _ = built
    strict = dataclasses.replace(ecfg, unet_atol=0.0, out_dir=str(root / "strict"))
    with pytest.raises(Exception, match="unet.onnx.*exceeds the tolerance 0.0"):
        ex.run(strict, rc, DATASET, PAIR)
    assert not (root / "strict").exists() or not list((root / "strict").iterdir())


def test_bad_inputs_give_clear_errors(built, tmp_path, capsys):
    root, ecfg, rc, _ = built
    with pytest.raises(ConfigError, match="unknown pair 'nope'"):
        ex.run(ecfg, rc, DATASET, "nope")
    with pytest.raises(FileNotFoundError, match="prepared dataset not found"):
        ex.run(ecfg, rc, "other", PAIR)
    swapped = dataclasses.replace(rc, pairs={PAIR: type(rc.pairs[PAIR])(z="cnn-c", c="gcn-z")})
    with pytest.raises(ex.ExportError, match="predicts 'c' but is the pair's 'z' decoder"):
        ex.run(ecfg, swapped, DATASET, PAIR)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"export": config_to_dict(ecfg), "reconstruct": config_to_dict(rc)}))
    assert ex.main(["--params", str(params), "--dataset", DATASET, "--pair", "nope"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown pair")


def test_fp16_variants_are_exported_and_close_to_fp32(built):
    root, ecfg, rc, fp32_bundle = built
    from brainldm.runtime.reconstructor import Reconstructor
    from tests.export.tiny_bundle import raw_test

    half = dataclasses.replace(ecfg, fp16=True, out_dir=str(root / "half"))
    bundle = ex.run(half, rc, DATASET, PAIR)
    m = json.loads((bundle / "manifest.json").read_text())
    for name in bf.FP16_MODELS:
        assert m["models"][name]["fp16_file"] == f"models/{name}.fp16.onnx"
        check = json.loads((Path(half.checks_dir) / f"{DATASET}-{PAIR}.json").read_text())["graphs"][name]
        assert 0 < max(check["fp16_max_abs_vs_fp32"].values()) <= half.fp16_atol
    assert "fp16_file" not in m["models"]["z_decoder"]
    raw = raw_test()
    args = (raw["betas"], raw["session"], raw["image_index"])
    full = Reconstructor(fp32_bundle, threads=1).reconstruct_float(*args, samples=1)
    reduced = Reconstructor(bundle, threads=1, fp16=True).reconstruct_float(*args, samples=1)
    psnr = 10 * np.log10(1.0 / np.mean((full - reduced) ** 2))
    assert psnr > 30 and not np.array_equal(full, reduced)


def test_tensorrt_is_skipped_with_a_message_when_missing(tmp_path, monkeypatch, capsys):
    from brainldm.export import tensorrt_engines as te

    monkeypatch.setattr(te, "tensorrt_available", lambda: False)
    assert te.build_all(tmp_path, {}, (1, 4), (4, 4)) is None
    assert "tensorrt is not importable; skipping TensorRT engines" in capsys.readouterr().err
    assert te.engine_folder_name("10.3.0", "NVIDIA H100 80GB HBM3") == "10.3.0_NVIDIA-H100-80GB-HBM3"
