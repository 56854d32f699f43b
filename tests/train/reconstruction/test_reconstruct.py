import dataclasses

import h5py
import numpy as np
import pytest
from PIL import Image

from brainldm.train.reconstruction import reconstruct as rc
from tests.tiny_models import LATENT_CHANNELS, TEXT_WIDTH, save_tiny_pipeline

N_TEST, T = 3, 5


def _write_inputs(root, z_channels=LATENT_CHANNELS, c_index_shift=0):
    rng = np.random.default_rng(0)
    index = np.arange(10, 10 + N_TEST)
    for name, pred in (("gcn-z", rng.standard_normal((N_TEST, z_channels, 4, 4))),
                       ("cnn-c", rng.standard_normal((N_TEST, T, TEXT_WIDTH)))):
        path = root / "decode" / "ds" / f"{name}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f["pred"] = pred.astype(np.float32)
            f["image_index"] = index + (c_index_shift if name == "cnn-c" else 0)
    (root / "targets").mkdir(exist_ok=True)
    with h5py.File(root / "targets" / "ds.h5", "w") as f:
        f["uncond"] = rng.standard_normal((T, TEXT_WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model") / "ldm")


def _config(root, model_dir, **overrides):
    cfg = rc.ReconstructConfig(
        model=str(model_dir), pairs={"ours": rc.PairConfig(z="gcn-z", c="cnn-c")}, samples=2, steps=10,
        batch_size=4, decode_dir=str(root / "decode"), targets_dir=str(root / "targets"), out_dir=str(root / "out"),
    )
    return dataclasses.replace(cfg, **overrides)


def _images(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_writes_all_items_and_samples_deterministically(tmp_path, model_dir):
    _write_inputs(tmp_path)
    out = rc.run(_config(tmp_path, model_dir), "ds", "ours")
    first = _images(out)
    assert sorted(first) == [f"item{i:04d}_s{s}.png" for i in range(N_TEST) for s in range(2)]
    assert next(iter(first.values())).shape == (16, 16, 3)
    index = (out / "index.csv").read_text().splitlines()
    assert index[0] == "test_item,image_index,sample,file" and index[1] == "0,10,0,item0000_s0.png"
    again = _images(rc.run(_config(tmp_path, model_dir), "ds", "ours"))
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_batch_composition_does_not_change_images(tmp_path, model_dir):
    _write_inputs(tmp_path)
    one = _images(rc.run(_config(tmp_path, model_dir, batch_size=1, out_dir=str(tmp_path / "a")), "ds", "ours"))
    many = _images(rc.run(_config(tmp_path, model_dir, batch_size=6, out_dir=str(tmp_path / "b")), "ds", "ours"))
    assert max(np.abs(one[k].astype(int) - many[k].astype(int)).max() for k in one) <= 1


def test_seed_changes_images_and_samples_differ(tmp_path, model_dir):
    _write_inputs(tmp_path)
    a = _images(rc.run(_config(tmp_path, model_dir), "ds", "ours"))
    b = _images(rc.run(_config(tmp_path, model_dir, seed=7, out_dir=str(tmp_path / "b")), "ds", "ours"))
    assert not np.array_equal(a["item0000_s0.png"], b["item0000_s0.png"])
    assert not np.array_equal(a["item0000_s0.png"], a["item0000_s1.png"])


def test_given_noise_is_used(model_dir):
    pipe = rc.load_reference_pipeline(model_dir)
    cfg = rc.ReconstructConfig(steps=10, strength=1.0, guidance=1.0, encode_mode="mean")
    z = np.zeros((1, LATENT_CHANNELS, 4, 4), np.float32)
    c = np.zeros((1, T, TEXT_WIDTH), np.float32)
    first = rc.reconstruct_batch(pipe, z, c, c[0], np.array([0]), np.array([0]), cfg)
    second = rc.reconstruct_batch(pipe, z, c, c[0], np.array([1]), np.array([0]), cfg)
    assert first.shape == (1, 16, 16, 3) and 0 <= first.min() and first.max() <= 1
    assert np.abs(first - second).max() > 1e-3


def test_bad_inputs_give_clear_errors_and_no_output(tmp_path, model_dir):
    _write_inputs(tmp_path, z_channels=3)
    with pytest.raises(rc.ReconstructError, match="3 channels but the model's VAE expects 4"):
        rc.run(_config(tmp_path, model_dir), "ds", "ours")
    _write_inputs(tmp_path, c_index_shift=1)
    with pytest.raises(rc.ReconstructError, match="different test images"):
        rc.run(_config(tmp_path, model_dir), "ds", "ours")
    with pytest.raises(rc.ReconstructError, match="missing predictions"):
        rc.run(_config(tmp_path, model_dir), "other", "ours")
    with pytest.raises(rc.ConfigError, match="unknown pair"):
        rc.run(_config(tmp_path, model_dir), "ds", "nope")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_forward_diffusion_is_the_runtimes_bit_for_bit():
    """The reference's add_noise takes correctly rounded square roots (numpy's), so it equals the
    lean runtime's numpy DDIM exactly; diffusers' own (torch.sqrt) only within one ulp."""
    import torch
    from diffusers import DDIMScheduler

    from brainldm.runtime.ddim import DDIMScheduler as NumpyDDIM
    from brainldm.train.reconstruction.img2img import add_noise

    torch_scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    numpy_scheduler = NumpyDDIM.from_config(dict(torch_scheduler.config))
    numpy_scheduler.set_alphas_cumprod(torch_scheduler.alphas_cumprod.numpy())
    rng = np.random.default_rng(0)
    x0, eps = (rng.standard_normal((64, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = rng.integers(0, 1000, 64)
    ours = add_noise(torch_scheduler, torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    np.testing.assert_array_equal(ours, numpy_scheduler.add_noise(x0, eps, t))
    theirs = torch_scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_loading_the_reference_prints_no_safety_checker_or_accelerate_notice(model_dir, capfd):
    """diffusers' notices (#19) are avoided where they arise: requires_safety_checker=False and
    low_cpu_mem_usage=False, what it falls back to without accelerate, stated; its logging stays on."""
    rc.load_reference_pipeline(model_dir)
    err = capfd.readouterr().err
    assert "safety checker" not in err and "accelerate" not in err, err


def test_the_ceiling_pair_reconstructs_the_test_images_true_targets(tmp_path, model_dir):
    """The ceiling row of Table 4 is what a perfect decoder gives: the same images as a pair whose
    predictions are exactly the test images' targets (in the test split's order, not the file's)."""
    rng = np.random.default_rng(1)
    z_all = rng.standard_normal((15, LATENT_CHANNELS, 4, 4)).astype(np.float32)
    c_all = rng.standard_normal((15, T, TEXT_WIDTH)).astype(np.float32)
    test_index = np.array([12, 10, 11, 10])  # not sorted, one image twice: rows must follow the split
    (tmp_path / "targets").mkdir()
    with h5py.File(tmp_path / "targets" / "ds.h5", "w") as f:
        f["z"], f["c"], f["uncond"] = z_all, c_all, rng.standard_normal((T, TEXT_WIDTH)).astype(np.float32)
    (tmp_path / "prepared").mkdir()
    with h5py.File(tmp_path / "prepared" / "ds.h5", "w") as f:
        f["splits/test/image_index"] = test_index
    for name, rows in (("perfect-z", z_all[test_index]), ("perfect-c", c_all[test_index])):
        (tmp_path / "decode" / "ds").mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp_path / "decode" / "ds" / f"{name}.h5", "w") as f:
            f["pred"], f["image_index"] = rows, test_index
    cfg = _config(tmp_path, model_dir, prepared_dir=str(tmp_path / "prepared"),
                  pairs={"ceiling": rc.PairConfig(z=rc.TRUE_TARGETS, c=rc.TRUE_TARGETS),
                         "perfect": rc.PairConfig(z="perfect-z", c="perfect-c")})
    pred = rc.load_predictions(cfg, "ds", cfg.pairs["ceiling"])
    np.testing.assert_array_equal(pred["image_index"], test_index)
    np.testing.assert_array_equal(pred["z"], z_all[test_index])
    np.testing.assert_array_equal(pred["c"], c_all[test_index])
    ceiling, perfect = _images(rc.run(cfg, "ds", "ceiling")), _images(rc.run(cfg, "ds", "perfect"))
    assert sorted(ceiling) == sorted(perfect) and len(ceiling) == 2 * len(test_index)
    assert all(np.array_equal(ceiling[k], perfect[k]) for k in ceiling)


def test_importing_the_pipeline_prints_no_torchvision_fallback_note():
    """transformers' note about its image processors (unused here) is dropped; its other messages are not."""
    import subprocess
    import sys

    code = ("import brainldm.train.reconstruction.reconstruct\n"
            "from transformers.utils import logging\n"
            "logging.get_logger('transformers.utils.import_utils').warning('another note')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stderr
    assert "requires torchvision" not in err and "another note" in err
