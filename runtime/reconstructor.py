"""Batched reconstruction from raw betas with a bundle: no torch, no tokenizer, no text encoder.

Mirrors the reference (train/reconstruction/reconstruct.py, diffusers' StableDiffusionImg2ImgPipeline
with DDIM, eta = 0) step by step; see ``Reconstructor.generate``. Noise is drawn with
numpy from (seed, item, sample, stream) by ``generation.numpy_noise``, the function the
reference draws its noise with, so the same inputs give the same images, whatever the
batch composition. The item index
that seeds the noise is the item's position among the sorted unique group ids (or its
row without groups): with group = image index that is the reference's test item index,
as the test split is sorted by image row (see runtime/preprocess.py).

Resizing (only when the bundle's generation resolution differs from the model's native
size; never for the default models) reproduces torch's bicubic interpolation
(``preprocess.resize_bicubic``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brainldm.runtime import preprocess
from brainldm.runtime.backends import create_backend
from brainldm.runtime.bundle import load_bundle
from brainldm.runtime.bundle_format import DECODER_KEYS, FP16_MODELS, MODEL_NAMES, decoder_model
from brainldm.runtime.ddim import DDIMScheduler, classifier_free_guidance
from brainldm.runtime.generation import NOISE_STREAM_DIFFUSION, NOISE_STREAM_POSTERIOR, numpy_noise, to_uint8

__all__ = ["PredictedTargets", "Reconstructor", "to_uint8"]  # to_uint8: callers quantise reconstruct_float's images with it
STATIC_UNET_INPUTS = frozenset({"encoder_hidden_states"})  # one copy to the GPU per batch, not per step


@dataclass(frozen=True)
class PredictedTargets:
    """The brain decoders' outputs per item: ids (m,) int64 group ids (or rows), z (m, C, h, w), c (m, T, D) float32."""

    ids: np.ndarray
    z: np.ndarray
    c: np.ndarray


StepCallback = Callable[[int, int, np.ndarray], None]  # (step index, timestep, latents (B, C, h, w))


class Reconstructor:
    """Reconstruct images from raw betas with a bundle on one backend.

    Args:
        bundle_dir: folder written by ``brainldm.export.export``.
        backend: "ort-cpu" (default), "ort-cuda", "ort-trt" or "tensorrt".
        threads: CPU threads (0 = all cores); ort-cpu splits each batch over them (SplitCpuModel).
        verify: check every bundle file's sha256 at load.
        fp16: ONNX backends use the fp16 UNet/VAE graphs (export.fp16); TensorRT engines are fp16 anyway.
    """

    def __init__(self, bundle_dir: str | Path, backend: str = "ort-cpu", threads: int = 0, verify: bool = True,
                 fp16: bool = False):
        self.bundle = load_bundle(bundle_dir, verify=verify)
        engine = create_backend(backend, threads)
        self.models = {name: engine.load(self.bundle, name, fp16=fp16 and name in FP16_MODELS) for name in MODEL_NAMES}
        self.scheduler = DDIMScheduler.from_config(self.bundle.manifest.scheduler.config)
        # diffusers' own alphas_cumprod: the numpy DDIM then matches torch's loop bit for bit
        self.scheduler.set_alphas_cumprod(self.bundle.alphas_cumprod)
        image = self.bundle.image_model
        self.scaling = np.float32(image.scaling_factor)
        self.resolution = image.resolution
        self.latent_shape = image.latent_shape
        # the bundle's generation settings as a plain mapping, for callers that pick defaults by name (the CLI)
        self.generation = dataclasses.asdict(self.bundle.generation)

    def _run(self, name: str, static: frozenset[str] = frozenset(), **feeds: np.ndarray) -> list[np.ndarray]:
        return self.models[name].run({k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()}, static)

    def predict_targets(self, betas: np.ndarray, session=None, group=None, batch_size: int = 64) -> PredictedTargets:
        """Brain decoding: raw ``betas (n, V)`` (+ session (n,) 1-based, group (n,) ids) -> per-item z and c.

        Named for what comes out (the decoders' predicted targets), not "decode", which in an LDM is the VAE's.
        """
        ids, inputs = preprocess.preprocess(betas, session, group, self.bundle)
        out = {}
        for key in DECODER_KEYS:
            x = inputs[key]
            parts = [self._run(decoder_model(key), x=x[s:s + batch_size])[0] for s in range(0, len(x), batch_size)]
            out[key] = np.concatenate(parts).astype(np.float32)
        return PredictedTargets(ids, out["z"], out["c"])

    def _noise(self, stream: int, items: np.ndarray, samples: np.ndarray, seed: int, noise) -> np.ndarray:
        key = "posterior" if stream == NOISE_STREAM_POSTERIOR else "diffusion"
        if noise is not None:
            return np.asarray(noise[key], np.float32)[items, samples]
        return np.stack([numpy_noise(seed, int(i), int(s), stream, self.latent_shape) for i, s in zip(items, samples)])

    def generate(self, z: np.ndarray, c: np.ndarray, items: np.ndarray, samples: np.ndarray, seed: int,
                 noise: dict | None = None, on_step: StepCallback | None = None,
                 init: np.ndarray | None = None) -> np.ndarray:
        """img2img from predicted latents and text states; returns images (B, R, R, 3) float32 in [0, 1].

        Args:
            z: (B, C, h, w) float32 latents x scaling; c: (B, T, D) float32 text states.
            items, samples: (B,) ints seeding the noise (item = position in sorted group order).
            noise: optional {"posterior", "diffusion"} -> (m, K, C, h', w') float32 given noise,
                indexed [items, samples], instead of the seeded draws.
            on_step: called after every DDIM step with (i, t, latents).
            init: optional (B, C, h', w') float32 re-encoded latents x scaling that replace steps 1-3
                (parity feeds the reference's, to compare the denoising loop from identical inputs).
        """
        g = self.bundle.generation
        if init is None:
            init = self.reencode(z, items, samples, seed, noise)
        # 4. Forward diffusion to the strength's first timestep with stream-1 noise.
        self.scheduler.set_timesteps(g.steps)
        timesteps = self.scheduler.img2img_timesteps(g.strength)
        diffusion = self._noise(NOISE_STREAM_DIFFUSION, items, samples, seed, noise)
        latents = self.scheduler.add_noise(init, diffusion, np.full(len(z), timesteps[0], np.int64))
        # 5. Denoise: one UNet call on [uncond; cond] (diffusers' order), guidance, DDIM step.
        hidden = np.concatenate([np.broadcast_to(self.bundle.uncond, c.shape), c]).astype(np.float32)
        for i, t in enumerate(timesteps):
            doubled = np.concatenate([latents, latents])
            eps = self._run("unet", STATIC_UNET_INPUTS, sample=doubled, timestep=np.full(len(doubled), t, np.float32),
                            encoder_hidden_states=hidden)[0]
            eps_uncond, eps_text = np.split(eps, 2)
            latents = self.scheduler.step(classifier_free_guidance(eps_uncond, eps_text, g.guidance), int(t), latents)
            if on_step is not None:
                on_step(i, int(t), latents)
        # 6. Decode and map [-1, 1] -> [0, 1] like diffusers' postprocess; NCHW -> NHWC.
        image = self._run("vae_decoder", latents=latents / self.scaling)[0]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)

    def reencode(self, z: np.ndarray, items: np.ndarray, samples: np.ndarray, seed: int,
                 noise: dict | None) -> np.ndarray:
        """Steps 1-3 of :meth:`generate`: z (B, C, h, w) -> init latents (B, C, h', w'), both x scaling."""
        # 1. Decode z (the VAE decoder takes unscaled latents) and clamp, as reencode_latents.
        image = np.clip(self._run("vae_decoder", latents=z / self.scaling)[0], -1.0, 1.0)
        # 2. Resize to the generation resolution (torch-bicubic in numpy; no-op at the native size).
        if image.shape[-1] != self.resolution:
            image = preprocess.resize_bicubic(image, self.resolution)
        # 3. Encode again: posterior mean (+ std * stream-0 noise), times the scaling factor.
        mean, std = self._run("vae_encoder", image=image)
        if self.bundle.generation.encode_mode == "sample":
            mean = mean + std * self._noise(NOISE_STREAM_POSTERIOR, items, samples, seed, noise)
        return mean * self.scaling

    def iter_batches(self, predicted: PredictedTargets, samples: int, seed: int, noise: dict | None = None,
                     batch_size: int = 8, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (items (B,), samples (B,), images (B, R, R, 3) float32) over all (item, sample) pairs."""
        if samples < 1 or batch_size < 1:
            raise ValueError(f"samples={samples} and batch_size={batch_size}; expected both >= 1")
        items, sample_idx = np.divmod(np.arange(len(predicted.ids) * samples), samples)
        starts = range(0, len(items), batch_size)
        # a context, not a wrapped iterator: a failing or interrupted batch closes the bar at once,
        # before the caller prints its message (a wrapped iterator closes only when collected)
        with tqdm(total=len(starts), desc="reconstruct", unit="batch", disable=not progress) as bar:
            for start in starts:
                it, sa = items[start:start + batch_size], sample_idx[start:start + batch_size]
                yield it, sa, self.generate(predicted.z[it], predicted.c[it], it, sa, seed, noise)
                bar.update()

    def reconstruct_float(self, betas: np.ndarray, session=None, group=None, samples: int | None = None,
                          seed: int | None = None, noise: dict | None = None, batch_size: int = 8) -> np.ndarray:
        """Raw betas -> images (m, K, R, R, 3) float32 in [0, 1]; m items, K samples (bundle defaults)."""
        samples = int(self.bundle.generation.samples if samples is None else samples)
        seed = int(self.bundle.generation.seed if seed is None else seed)
        predicted = self.predict_targets(betas, session, group)
        out = np.empty((len(predicted.ids), samples, self.resolution, self.resolution, 3), np.float32)
        for it, sa, images in self.iter_batches(predicted, samples, seed, noise, batch_size):
            out[it, sa] = images
        return out

    def reconstruct(self, betas: np.ndarray, session=None, group=None, samples: int | None = None,
                    seed: int | None = None, noise: dict | None = None, batch_size: int = 8) -> np.ndarray:
        """Raw betas -> images (m, K, R, R, 3) uint8 (rint(x * 255) of reconstruct_float)."""
        return to_uint8(self.reconstruct_float(betas, session, group, samples, seed, noise, batch_size))
