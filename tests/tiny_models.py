"""Tiny, seeded SD-v1-shaped models for tests (random weights, real diffusers/transformers classes)."""
from __future__ import annotations

from pathlib import Path

LATENT_CHANNELS = 4
TEXT_WIDTH = 16
IMAGE_SIZE = 16  # px; the VAE halves it twice -> 4x4 latents


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionImg2ImgPipeline with tiny random components (16 px images, 4x4x4 latents)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
    ))
    tokenizer = _tiny_tokenizer(CLIPTokenizer)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_tokenizer(cls):
    import json
    import tempfile

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(letters + [f"{c}</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return cls(vocab_file=str(Path(tmp) / "vocab.json"), merges_file=str(Path(tmp) / "merges.txt"), model_max_length=77)


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save :func:`build_tiny_pipeline` as a diffusers folder (safetensors) and return it."""
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
