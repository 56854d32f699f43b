"""Stage train_ldm on tiny configs: losses fall, determinism, the saved folder, the metrics."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from brainldm.train.ldm import train_ldm as L

from brainldm.train.simulation import scenes
from brainldm.train.config import config_to_dict
from brainldm.train.ldm.image_model import pixels_to_vae
from brainldm.train.ldm.tokenizer import build_tokenizer


def tiny_config(tmp_path, **kw) -> L.TrainLdmConfig:
    base = L.TrainLdmConfig(
        n_train=16, image_size=32, n_captions=2, device="cpu", out=str(tmp_path / "ldm"),
        metrics=str(tmp_path / "m.json"),
        vae=L.VaeConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, steps=3, batch_size=4),
        text=L.TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        unet=L.UnetConfig(block_out_channels=(8, 16), attention_head_dim=2, norm_num_groups=4, steps=3, batch_size=4),
        eval=L.EvalConfig(n_images=4, steps=4, batch_size=4),
    )
    return dataclasses.replace(base, **kw)


def setup(cfg):
    torch.manual_seed(0)
    images, captions, _, _ = scenes.generate(cfg.n_train, 1, cfg.image_size, cfg.n_captions)
    tok = build_tokenizer([c for caps in captions for c in caps])
    return pixels_to_vae(images), captions, tok, L.build_models(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)


def test_vae_and_denoiser_steps_lower_the_loss(tmp_path):
    cfg = tiny_config(tmp_path)
    x, captions, tok, (vae, text, unet) = setup(cfg)
    gen = torch.Generator().manual_seed(0)
    vae_losses = L.train_vae(vae, x[:4], dataclasses.replace(cfg.vae, steps=40, lr=3e-3), torch.device("cpu"), gen)
    assert np.mean(vae_losses[-5:]) < 0.6 * np.mean(vae_losses[:5])
    moments = L.encode_moments(vae, x, torch.device("cpu"))
    sf = L.latent_scaling_factor(*moments, gen)
    ids = L.tokenize(tok, [c for caps in captions for c in caps]).view(len(captions), cfg.n_captions, -1)
    unet_cfg = dataclasses.replace(cfg.unet, steps=40, batch_size=16, lr=3e-3)
    losses = L.train_denoiser(text, unet, moments, ids, L.tokenize(tok, [""])[0], sf, unet_cfg, torch.device("cpu"), gen)
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])


def test_min_snr_weights_down_only_the_low_noise_steps():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**L.SCHEDULE)
    pred, eps = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    t = torch.tensor([10, 900])  # SNR(10) >> 5, SNR(900) << 5
    plain_loss, plain = L.denoising_loss(pred, eps, t, sched, 0.0)
    weighted, plain_again = L.denoising_loss(pred, eps, t, sched, 5.0)
    assert float(plain_loss) == plain == plain_again == pytest.approx(1.0)
    snr_10 = float(sched.alphas_cumprod[10] / (1 - sched.alphas_cumprod[10]))
    assert float(weighted) == pytest.approx((5.0 / snr_10 + 1.0) / 2, rel=1e-5)


def test_ema_changes_the_saved_weights_not_the_trajectory(tmp_path):
    cfg = tiny_config(tmp_path)
    runs = []
    for decay in (0.0, 0.9):
        x, captions, tok, (vae, text, unet) = setup(cfg)
        moments = L.encode_moments(vae, x, torch.device("cpu"))
        ids = L.tokenize(tok, [c for caps in captions for c in caps]).view(len(captions), cfg.n_captions, -1)
        unet_cfg = dataclasses.replace(cfg.unet, steps=6, ema_decay=decay)
        losses = L.train_denoiser(text, unet, moments, ids, L.tokenize(tok, [""])[0], 1.0, unet_cfg,
                                  torch.device("cpu"), torch.Generator().manual_seed(0))
        runs.append((losses, torch.cat([p.flatten() for p in unet.parameters()])))
    assert runs[0][0] == runs[1][0]
    assert not torch.allclose(runs[0][1], runs[1][1])


def test_scaling_factor_gives_unit_variance():
    mean, std = torch.randn(64, 4, 2, 2) * 3.0, torch.full((64, 4, 2, 2), 1e-3)
    sf = L.latent_scaling_factor(mean, std, torch.Generator().manual_seed(0))
    assert sf == pytest.approx(1 / 3.0, rel=0.1)
    assert float((mean * sf).std()) == pytest.approx(1.0, rel=0.05)


def test_train_saves_a_loadable_deterministic_pipeline(tmp_path):
    from brainldm.train.ldm.image_model import load_image_model, scaling_factor

    a = L.run(tiny_config(tmp_path / "a"))
    b = L.run(tiny_config(tmp_path / "b"))
    assert a["vae"]["losses"] == b["vae"]["losses"] and a["unet"]["losses"] == b["unet"]["losses"]
    folder = tmp_path / "a" / "ldm"
    for name in ("model_index.json", "vae/config.json", "unet/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                 "training_config.json", "training_log.json"):
        assert (folder / name).is_file(), name
    assert scaling_factor(folder) == pytest.approx(a["scaling_factor"])
    assert json.loads((folder / "training_config.json").read_text())["vae"]["steps"] == 3
    pipe = load_image_model(folder)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 16
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # atomic: no temp left


def test_evaluate_and_main(tmp_path):
    params = tmp_path / "params.yaml"
    cfg = tiny_config(tmp_path)
    params.write_text("train_ldm: " + json.dumps(L.config_to_dict(cfg)))
    assert L.main(["--params", str(params)]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_images"] == 4 and metrics["gt_colour_acc"] == 1.0
    # vae_pixcorr recomputed apart: the saved VAE's posterior-mean round trip of the held-out scenes
    assert metrics["vae_pixcorr"] == pytest.approx(_vae_round_trip_pixcorr(cfg), abs=1e-6)
    # the img2img metrics are of other images than the round trip's and than each other's
    assert len({metrics[k] for k in ("vae_pixcorr", "img2img_pixcorr", "swapped_pixcorr")}) == 3
    assert 0 < metrics["size_mb"] < 20


def test_held_out_img2img_keys_its_noise_by_image_not_by_batch(tmp_path):
    """The held-out img2img is the reconstruct stage's: one image's result does not depend on the
    batch it ran in, and it equals ``reconstruct_batch`` for (that image, sample 0)."""
    from brainldm.runtime.generation import to_uint8
    from brainldm.train.ldm import held_out as E
    from brainldm.train.reconstruction.reconstruct import ReconstructConfig, load_reference_pipeline, reconstruct_batch

    cfg = tiny_config(tmp_path)
    L.run(cfg)
    pipe = load_reference_pipeline(cfg.out)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 4, 4, 4)).astype(np.float32)
    c = rng.standard_normal((4, 77, 16)).astype(np.float32)
    uncond = rng.standard_normal((77, 16)).astype(np.float32)
    whole = E.img2img(pipe, z, c, uncond, cfg.eval)
    pairs = E.img2img(pipe, z, c, uncond, dataclasses.replace(cfg.eval, batch_size=2))
    np.testing.assert_array_equal(whole, pairs)
    settings = ReconstructConfig(steps=cfg.eval.steps, strength=cfg.eval.strength, guidance=cfg.eval.guidance,
                                 seed=cfg.eval.seed, encode_mode=cfg.eval.encode_mode)
    third = reconstruct_batch(pipe, z[2:3], c[2:3], uncond, np.array([2]), np.array([0]), settings)
    np.testing.assert_array_equal(whole[2], to_uint8(third[0]))


def _vae_round_trip_pixcorr(cfg: L.TrainLdmConfig) -> float:
    """Mean PixCorr of the held-out scenes (eval seed) vs their VAE round trip (posterior mean, uint8)."""
    from diffusers import AutoencoderKL

    from brainldm.train.evaluation.metrics import pixcorr

    gt, _, _, _ = scenes.generate(cfg.eval.n_images, cfg.eval.seed, cfg.image_size, cfg.n_captions)
    vae = AutoencoderKL.from_pretrained(f"{cfg.out}/vae").eval()
    x = torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    images = np.clip(np.rint((recon.clamp(-1, 1).numpy() / 2 + 0.5) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return float(np.mean(pixcorr(gt, images)))


def test_bad_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="train_ldm.device: got 'gpu', expected 'cpu', 'cuda' or 'auto'"):
        L.run(tiny_config(tmp_path, device="gpu"))
    params = tmp_path / "params.yaml"
    cfg = tiny_config(tmp_path)
    section = config_to_dict(dataclasses.replace(cfg, seed=3, eval=dataclasses.replace(cfg.eval, seed=3),
                                                 out=str(tmp_path / "none")))
    params.write_text(json.dumps({"train_ldm": section}))
    assert L.main(["--params", str(params), "--skip-train"]) == 1
    assert "eval.seed must differ" in capsys.readouterr().err


def test_configured_block_types_and_vae_mid_attention(tmp_path):
    unet = L.UnetConfig(block_out_channels=(8, 16, 16), attention_head_dim=2, norm_num_groups=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), steps=3, batch_size=4)
    cfg = tiny_config(tmp_path, vae=dataclasses.replace(tiny_config(tmp_path).vae, mid_block_add_attention=False), unet=unet)
    _, _, _, (vae, _, model) = setup(cfg)
    assert list(model.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(model.config.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert vae.encoder.mid_block.attentions[0] is None
    # The default keeps SD's layout: cross-attention everywhere but the lowest level, mid attention in the VAE.
    _, _, _, (vae, _, model) = setup(tiny_config(tmp_path))
    assert list(model.config.down_block_types) == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(model.config.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert vae.encoder.mid_block.attentions[0] is not None


@pytest.mark.parametrize("types", [("DownBlock2D",), ("DownBlock2D", "AttnDownBlock2D")])
def test_bad_block_types(types):
    with pytest.raises(ValueError, match="down_block_types.*one per block_out_channels"):
        L.unet_down_block_types(L.UnetConfig(block_out_channels=(8, 16), down_block_types=types))
