"""The image-model loader: a tiny SD-v1-shaped diffusers folder, helpers, img2img, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from brainldm.train.ldm import image_model
from brainldm.train.ldm.image_model import ImageModelError, load_image_model
from brainldm.train.reconstruction.img2img import add_noise
from brainldm.train.ldm.tokenizer import build_tokenizer
from brainldm.train.ldm.train_ldm import TextConfig, TrainLdmConfig, UnetConfig, VaeConfig, build_models, save_pipeline

SCALE = 0.5  # a scaling_factor that no default could produce


def tiny_config(latent_channels: int = 4) -> TrainLdmConfig:
    """SD v1 geometry (4 VAE blocks -> f = 8, 4 latent channels, 77 tokens) at toy widths."""
    return TrainLdmConfig(
        image_size=32,
        vae=VaeConfig(block_out_channels=(8, 8, 8, 8), latent_channels=latent_channels, norm_num_groups=4),
        text=TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        unet=UnetConfig(block_out_channels=(8, 16), attention_head_dim=2, norm_num_groups=4),
    )


def make_tiny_model(folder, seed: int = 0, latent_channels: int = 4):
    torch.manual_seed(seed)
    tok = build_tokenizer(["a red circle on a grey background", "two blue squares"])
    vae, text, unet = build_models(tiny_config(latent_channels), len(tok), tok.bos_token_id, tok.eos_token_id)
    vae.register_to_config(scaling_factor=SCALE)
    save_pipeline(folder, vae, text, tok, unet)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "ldm")


def test_helpers_read_the_saved_config(tiny):
    assert image_model.vae_scale_factor(tiny) == 8
    assert image_model.latent_channels(tiny) == 4
    assert image_model.scaling_factor(tiny) == SCALE
    assert image_model.text_geometry(tiny) == (77, 16)


def test_loads_and_runs_img2img_from_latents_and_embeddings(tiny):
    from diffusers import DDIMScheduler

    pipe = load_image_model(tiny)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    assert pipe.vae.config.scaling_factor == SCALE
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 4, 4, generator=gen)
    c = torch.randn(2, 77, 16, generator=gen)
    uncond = torch.zeros(2, 77, 16)

    def run(cond):
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=z, strength=0.8, num_inference_steps=10,
                    guidance_scale=5.0, generator=torch.Generator().manual_seed(3), output_type="np").images

    a, b, other = run(c), run(c), run(c.flip(0))
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)  # deterministic given the generator
    assert np.abs(a - other).max() > 1e-4  # the text conditioning reaches the image


def test_latents_of_a_16_channel_vae_are_taken_as_latents(tmp_path):
    """diffusers' img2img takes only 4-channel latents as ``image``; the loader's pipeline takes the VAE's."""
    from diffusers import StableDiffusionImg2ImgPipeline

    folder = make_tiny_model(tmp_path / "ldm16", latent_channels=16)
    pipe = load_image_model(folder)
    gen = torch.Generator().manual_seed(1)
    z, c = torch.randn(2, 16, 4, 4, generator=gen), torch.randn(2, 77, 16, generator=gen)
    kwargs = dict(prompt_embeds=c, negative_prompt_embeds=torch.zeros_like(c), strength=0.8, num_inference_steps=10,
                  guidance_scale=5.0, output_type="latent")
    out = pipe(image=z, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert out.shape == (2, 16, 4, 4)
    # The first noised latents are sqrt(abar_t) z + sqrt(1 - abar_t) eps for the given z (not z re-encoded).
    pipe.scheduler.set_timesteps(10)
    timestep = pipe.scheduler.timesteps[2:3]  # strength 0.8 of 10 steps starts at the 3rd
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    got = pipe.prepare_latents(z, timestep, 2, 1, torch.float32, "cpu", torch.Generator().manual_seed(3))
    # diffusers' formula, with correctly rounded roots (img2img.add_noise) instead of torch.sqrt's
    torch.testing.assert_close(got, add_noise(pipe.scheduler, z, eps, timestep), rtol=0, atol=0)
    torch.testing.assert_close(got, pipe.scheduler.add_noise(z, eps, timestep), rtol=0, atol=1e-6)
    plain = StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.raises(RuntimeError):  # diffusers treats them as an image (resize, encode): why the subclass exists
        plain(image=z, generator=torch.Generator().manual_seed(3), **kwargs)


def test_missing_folder_names_the_layout(tmp_path):
    with pytest.raises(ImageModelError, match="model_index.json") as info:
        load_image_model(tmp_path / "nope")
    assert "stable-diffusion-v1-4" in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_missing_component_is_named(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ImageModelError, match=r"unet/"):
        load_image_model(broken)


def test_malformed_config_is_a_clear_error(tiny, tmp_path):
    broken = tmp_path / "bad"
    shutil.copytree(tiny, broken)
    (broken / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ImageModelError, match="vae"):
        image_model.scaling_factor(broken)
    with pytest.raises(ImageModelError, match="could not load"):
        load_image_model(broken)


def test_mismatched_latent_channels(tiny, tmp_path):
    broken = tmp_path / "mismatch"
    shutil.copytree(tiny, broken)
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["in_channels"] = 3
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImageModelError, match="latent_channels=4 but unet in_channels=3"):
        image_model.latent_channels(broken)


def test_single_file_needs_a_config_folder(tmp_path):
    ckpt = tmp_path / "sd.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ImageModelError, match="config="):
        load_image_model(ckpt)


def _resnet_to_ldm(key: str) -> str:
    for new, old in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        key = key.replace(new + ".", old + ".")
    return key


def unet_to_ldm(state: dict, n_levels: int, layers: int) -> dict:
    """Inverse of diffusers' convert_ldm_unet_checkpoint for a CrossAttn...Down / Up UNet (test helper)."""
    simple = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    out = {}
    for key, value in state.items():
        prefix = next((p for p in simple if key.startswith(p)), None)
        parts = key.split(".")
        if prefix:
            new = simple[prefix] + key[len(prefix):]
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            rest = _resnet_to_ldm(rest) if kind == "resnets" else rest
            new = f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
        else:
            block, i, kind, j, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            rest = _resnet_to_ldm(rest) if kind == "resnets" else rest
            slot = 0 if kind == "resnets" else 1
            if block == "down_blocks" and kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{rest.replace('conv.', '')}"
            elif block == "down_blocks":
                new = f"input_blocks.{i * (layers + 1) + j + 1}.{slot}.{rest}"
            elif kind == "upsamplers":
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions") for k in state)
                new = f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attn else 1}.{rest}"
            else:
                new = f"output_blocks.{i * (layers + 1) + j}.{slot}.{rest}"
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, n_levels: int) -> dict:
    """Inverse of diffusers' convert_ldm_vae_checkpoint (test helper): 1x1 conv attention, reversed up blocks."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            for a, b in attn.items():
                new = new.replace(f"mid_block.attentions.0.{a}.", f"mid.attn_1.{b}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        new = new.replace("down_blocks", "down").replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
        if ".up_blocks." in new:
            parts = new.split(".")
            parts[1], parts[2] = "up", str(n_levels - 1 - int(parts[2]))
            new = ".".join(parts)
        out["first_stage_model." + new.replace(".resnets.", ".block.")] = value
    return out


def test_single_file_checkpoint_loads_offline(tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_image_model(tiny, scheduler="saved")
    ckpt = {**unet_to_ldm(pipe.unet.state_dict(), 2, 1), **vae_to_ldm(pipe.vae.state_dict(), 4)}
    ckpt.update({"cond_stage_model.transformer.text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    file = tmp_path / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(file))
    loaded = load_image_model(file, config=tiny)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(want) == set(got), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"{name}.{key}")
    assert loaded.vae.config.scaling_factor == SCALE
