"""Stage targets on a tiny prepared file and a tiny SD-v1-shaped model."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from brainldm.train.decoding import targets

from brainldm.train.simulation import scenes
from brainldm.train.ldm.image_model import ImageModelError
from brainldm.train.decoding import targets
from brainldm.train.decoding.targets import TargetsConfig
from brainldm.train.ldm.tokenizer import build_tokenizer
from brainldm.train.ldm.train_ldm import TextConfig, TrainLdmConfig, UnetConfig, VaeConfig, build_models, save_pipeline

N = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "ldm"
    torch.manual_seed(0)
    tok = build_tokenizer(["a red circle on a grey background", "two blue squares"])
    cfg = TrainLdmConfig(
        image_size=32, vae=VaeConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4),
        text=TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        unet=UnetConfig(block_out_channels=(8, 16), attention_head_dim=2, norm_num_groups=4),
    )
    vae, text, unet = build_models(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
    vae.register_to_config(scaling_factor=0.5)
    save_pipeline(folder, vae, text, tok, unet)
    return folder


def write_prepared(folder, captions=None, images=None):
    images_, caps, _, _ = scenes.generate(N, 3, 24, 2)
    images = images_ if images is None else images
    captions = caps if captions is None else captions
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "toy.h5", "w") as f:
        f["images"] = images
        f.create_dataset("captions", data=[json.dumps(c) for c in captions], dtype=h5py.string_dtype())
    return caps


def config(tmp_path, model, **kw):
    base = dict(model=str(model), resolution=32, batch_size=2, prepared_dir=str(tmp_path / "prep"),
                targets_dir=str(tmp_path / "targets"), latent="sample")
    return TargetsConfig(**{**base, **kw})


def test_shapes_values_and_determinism(tmp_path, model):
    caps = write_prepared(tmp_path / "prep")
    out = targets.run(config(tmp_path, model), "toy")
    with h5py.File(out) as f:
        z, c, uncond = f["z"][()], f["c"][()], f["uncond"][()]
        assert f.attrs["format_version"] == 1 and f.attrs["scaling_factor"] == 0.5
        assert json.loads(f.attrs["config"])["n_tokens"] == 77
    assert z.shape == (N, 4, 4, 4) and c.shape == (N, 77, 16) and uncond.shape == (77, 16)
    assert z.dtype == c.dtype == uncond.dtype == np.float32
    np.testing.assert_array_equal(c[:, 0], np.broadcast_to(uncond[0], (N, 16)))
    # c is the mean of the per-caption states.
    from brainldm.train.ldm.image_model import load_image_model

    pipe = load_image_model(model)
    ids = pipe.tokenizer(caps[2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expect = pipe.text_encoder(ids).last_hidden_state.mean(0).numpy()
    np.testing.assert_allclose(c[2, 1:], expect[1:], atol=1e-5)
    # Same inputs -> same outputs; another batch size changes only float rounding.
    again = targets.run(config(tmp_path, model, targets_dir=str(tmp_path / "t2")), "toy")
    other = targets.run(config(tmp_path, model, batch_size=3, targets_dir=str(tmp_path / "t3")), "toy")
    with h5py.File(again) as f, h5py.File(other) as g:
        np.testing.assert_array_equal(f["z"][()], z)
        np.testing.assert_array_equal(f["c"][()], c)
        np.testing.assert_allclose(g["z"][()], z, atol=1e-5)
        np.testing.assert_allclose(g["c"][()], c, atol=1e-5)


def test_mean_vs_sample_and_fifteen_tokens(tmp_path, model):
    write_prepared(tmp_path / "prep")
    mean = targets.run(config(tmp_path, model, latent="mean", n_tokens=15), "toy")
    with h5py.File(mean) as f:
        z_mean, c15, u15 = f["z"][()], f["c"][()], f["uncond"][()]
    full = targets.run(config(tmp_path, model, targets_dir=str(tmp_path / "full")), "toy")
    with h5py.File(full) as f:
        z_sample, c77 = f["z"][()], f["c"][()]
    assert c15.shape == (N, 15, 16) and u15.shape == (15, 16)
    np.testing.assert_allclose(c15, c77[:, :15], atol=1e-6)  # causal encoder: a prefix of the 77 states
    assert 1e-4 < np.abs(z_sample - z_mean).max()


def test_unknown_words_are_tokenized(tmp_path, model):
    write_prepared(tmp_path / "prep", captions=[["a zebra-like quux"], ["x"], ["y"], ["é"], ["?!"]])
    out = targets.run(config(tmp_path, model), "toy")
    with h5py.File(out) as f:
        assert np.isfinite(f["c"][()]).all()


@pytest.mark.parametrize("captions, match", [
    ([["a"], [], ["b"], ["c"], ["d"]], r"captions\[1\] must be a non-empty"),
])
def test_empty_caption_list_is_an_error(tmp_path, model, captions, match):
    write_prepared(tmp_path / "prep", captions=captions)
    with pytest.raises(ValueError, match=match):
        targets.run(config(tmp_path, model), "toy")
    assert not (tmp_path / "targets").exists() or not any((tmp_path / "targets").iterdir())


def test_bad_inputs(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="prepared dataset not found"):
        targets.run(config(tmp_path, model), "toy")
    write_prepared(tmp_path / "prep")
    with pytest.raises(ImageModelError, match="model_index.json"):
        targets.run(config(tmp_path, tmp_path / "no_model"), "toy")
    with pytest.raises(ValueError, match="latent"):
        targets.run(config(tmp_path, model, latent="mode"), "toy")
    write_prepared(tmp_path / "grey", images=np.zeros((N, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"'images' must be \(N, H, W, 3\) uint8"):
        targets.run(config(tmp_path, model, prepared_dir=str(tmp_path / "grey")), "toy")
    assert not (tmp_path / "targets").exists() or not any((tmp_path / "targets").iterdir())


def test_main_reports_errors(tmp_path, model, capsys):
    import yaml

    section = yaml.safe_load((Path(__file__).parents[3] / "params.yaml").read_text())["targets"]
    section.update(model=str(tmp_path / "missing"), prepared_dir=str(tmp_path))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"targets": section}))
    write_prepared(tmp_path)
    assert targets.main(["--params", str(params), "--dataset", "toy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err and "Traceback" not in err


def _vae_latents_by_hand(model, images: np.ndarray, resolution: int):
    """Posterior (mean, std) of the diffusers VAE for images (N, H, W, 3) uint8, computed apart from the stage.

    The documented contract: LANCZOS resize to the resolution, pixels mapped to [-1, 1], NCHW.
    """
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    resized = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.LANCZOS))
                        for im in images])
    x = torch.from_numpy(resized.astype(np.float32) / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean.numpy(), dist.std.numpy(), float(vae.config.scaling_factor)


def test_z_is_the_vaes_own_encoding_times_the_scaling_factor(tmp_path, model):
    """z = scaling_factor x posterior mean (latent: mean), + std x the per-image seeded noise (latent: sample)."""
    write_prepared(tmp_path / "prep")
    with h5py.File(tmp_path / "prep" / "toy.h5") as f:
        images = f["images"][()]
    mean, std, sf = _vae_latents_by_hand(model, images, resolution=32)
    assert sf == 0.5  # the fixture's non-default factor, so that a missing or doubled factor shows
    seed = 3
    out_mean = targets.run(config(tmp_path, model, latent="mean"), "toy")
    out_sample = targets.run(config(tmp_path, model, seed=seed, targets_dir=str(tmp_path / "s")), "toy")
    with h5py.File(out_mean) as f, h5py.File(out_sample) as g:
        z_mean, z_sample = f["z"][()], g["z"][()]
        # z_mean (Table 3's perfect predictor) is the posterior mean under either definition of z
        np.testing.assert_array_equal(f["z_mean"][()], z_mean)
        np.testing.assert_array_equal(g["z_mean"][()], z_mean)
        assert (f.attrs["latent"], g.attrs["latent"]) == ("mean", "sample")
    np.testing.assert_allclose(z_mean, sf * mean, rtol=0, atol=1e-5)
    # the sampling noise of image i: numpy stream (seed, i), as the stage documents
    eps = np.stack([np.random.default_rng([seed, i]).standard_normal(mean.shape[1:]) for i in range(N)])
    np.testing.assert_allclose(z_sample, sf * (mean + std * eps.astype(np.float32)), rtol=0, atol=1e-5)


def test_main_reads_its_own_section_of_the_named_params_for_the_named_dataset(tmp_path, model, capsys, monkeypatch):
    import yaml

    section = yaml.safe_load((Path(__file__).parents[3] / "params.yaml").read_text())["targets"]  # every key is required
    section.update(model=str(model), prepared_dir=str(tmp_path / "prepared"))
    params = tmp_path / "my-params.yaml"
    params.write_text(yaml.safe_dump({"targets": section}))
    assert targets.main(["--params", str(params), "--dataset", "nope"]) == 1
    assert f"prepared dataset not found: {tmp_path / 'prepared' / 'nope.h5'} (" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        targets.main(["--params", str(params)])
    assert exit_info.value.code == 2 and "--dataset" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the default params file is ./params.yaml
    assert targets.main(["--dataset", "nope"]) == 1
    assert "error: params file not found: params.yaml (" in capsys.readouterr().err
