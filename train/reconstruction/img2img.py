"""diffusers' img2img pipeline, taking latents of any channel count as ``image``.

``StableDiffusionImg2ImgPipeline`` recognises latents passed as ``image`` by
``image.shape[1] == 4`` (SD's latent channels) and its image processor does the same
with a default of 4. A VAE with more latent channels (the small LDM uses 16, as SD3
and FLUX do, see train_ldm) would have its latents encoded again as if they were an
image. This subclass compares with the VAE's own ``latent_channels`` instead; for a
4-channel VAE it is diffusers' pipeline unchanged.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

# Importing diffusers' img2img pipeline makes transformers note that its CLIP and SigLIP image
# processors fall back to PIL without torchvision (which has no CPU build here). The project uses
# neither processor (they serve diffusers' safety checker and IP adapters), so that one note is
# dropped where transformers emits it; its other messages pass. Installed before the import.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

from diffusers import StableDiffusionImg2ImgPipeline  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SD_LATENT_CHANNELS = 4  # the value diffusers' img2img hard-codes


def add_noise(scheduler, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps: diffusers' ``add_noise``, its float32
    operations in its order, with correctly rounded square roots.

    original, noise: (B, C, h, w) on one device, float32 (or a CUDA half type: the square
    roots are then rounded to it, as diffusers' are); timesteps: (B,) or () ints. torch's float32
    sqrt is within 1 ulp but not correctly rounded, and which neighbour it returns depends on the
    processor (docs/reproducibility.md); numpy's is correctly rounded, as the runtime's DDIM.
    """
    abar = scheduler.alphas_cumprod.to(torch.float32).numpy()[np.atleast_1d(timesteps.cpu().numpy())]
    shape = (-1,) + (1,) * (original.ndim - 1)
    where = dict(device=original.device, dtype=original.dtype)  # CPU float32: no-ops, the same tensors
    sqrt_abar = torch.from_numpy(np.sqrt(abar)).reshape(shape).to(**where)
    sqrt_one_minus_abar = torch.from_numpy(np.sqrt(np.float32(1) - abar)).reshape(shape).to(**where)
    return sqrt_abar * original + sqrt_one_minus_abar * noise


class LatentImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """``StableDiffusionImg2ImgPipeline`` that accepts ``image`` = scaled latents (B, C, h, w)
    for the VAE's C (diffusers accepts only C = 4)."""

    def __call__(self, *args, **kwargs):
        # Set here, not in __init__: diffusers builds pipelines from __init__'s exact signature.
        if self.image_processor.config.vae_latent_channels != self.vae.config.latent_channels:
            self.image_processor.register_to_config(vae_latent_channels=self.vae.config.latent_channels)
        return super().__call__(*args, **kwargs)

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with z_0 = ``image`` when it is latents."""
        channels = self.vae.config.latent_channels
        if channels == SD_LATENT_CHANNELS or image.shape[1] != channels:
            return super().prepare_latents(image, timestep, batch_size, num_images_per_prompt, dtype, device,
                                           generator)
        if batch_size * num_images_per_prompt != image.shape[0]:
            raise ValueError(f"{image.shape[0]} init latents for {batch_size * num_images_per_prompt} images; "
                             "pass one latent per prompt")
        init_latents = image.to(device=device, dtype=dtype)
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return add_noise(self.scheduler, init_latents, noise, timestep)
