"""Stage `reconstruct`: the PyTorch reference reconstruction with diffusers' img2img.

For each test image and each (z-decoder, c-decoder) pair: decode the predicted latent
``z`` to an image, resize it to the generation resolution, re-encode it with the VAE,
noise it to ``strength`` and denoise with DDIM under classifier-free guidance,
conditioned on the predicted text states ``c`` (Takagi & Nishimoto 2023; the protocol:
docs/data-formats.md, "The generation protocol").

All randomness is drawn with numpy from ``(seed, test item, sample)`` by
``runtime/generation.py``'s ``numpy_noise`` and passed in, so the lean runtime (no
torch) reproduces the very same noise, and a batch's composition never changes an
image. The PNGs are quantised with the runtime's ``to_uint8``. ``device`` and ``dtype`` choose where
and in what precision (train/compute_options.py; CPU float32 by default).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path
from brainldm.runtime.generation import NOISE_STREAM_DIFFUSION, NOISE_STREAM_POSTERIOR, numpy_noise, to_uint8
from brainldm.train.compute_options import stage_device_dtype
from brainldm.train.config import ConfigError, config_to_record, execution_option, load_config, run_stage
from brainldm.train.reconstruction.img2img import LatentImg2ImgPipeline, add_noise
from brainldm.train.data.splits import load_targets, split_image_index

ENCODE_MODES = ("sample", "mean")  # the re-encoding's posterior sample (numpy noise) or its mean
TRUE_TARGETS = "targets"  # a pair's decoder name for the test images' true targets: the ceiling pair


@dataclass(frozen=True)
class PairConfig:
    """Which decoders supply the latent ``z`` and the text states ``c``."""

    z: str
    c: str


@dataclass(frozen=True)
class ReconstructConfig:
    """Params section `reconstruct`."""

    model: str = "models/ldm"
    pairs: dict[str, PairConfig] = field(default_factory=dict)
    samples: int = 5
    steps: int = 50
    strength: float = 0.8
    guidance: float = 5.0
    resolution: int = 0  # generation resolution in px; 0 = the model's native size
    encode_mode: str = "sample"  # re-encoding uses the posterior "sample" or "mean"
    seed: int = 42
    batch_size: int = 16
    device: str = execution_option("cpu")  # cpu | cuda | auto (train/compute_options.py)
    dtype: str = execution_option("float32")  # float16 / bfloat16 on CUDA only
    decode_dir: str = "results/decode"
    targets_dir: str = "data/targets"
    prepared_dir: str = "data/prepared"  # the test split's image rows, for the ceiling pair's true targets
    out_dir: str = "results/reconstruct"


class ReconstructError(ValueError):
    """Inputs of the reconstruction do not fit together."""


def check_encode_mode(mode: str, key: str) -> None:
    """ConfigError unless ``mode`` (the params key ``key``) is one of ``ENCODE_MODES``."""
    if mode not in ENCODE_MODES:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, ENCODE_MODES))}, got {mode!r}")


class GivenNoiseImg2ImgPipeline(LatentImg2ImgPipeline):
    """diffusers' img2img, except that the forward-diffusion noise is given, not drawn.

    Set ``given_noise`` (B, C, h, w) before calling; ``image`` must be the VAE's latents
    (already multiplied by the scaling factor).
    """

    given_noise: torch.Tensor | None = None

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        if self.given_noise is None or self.given_noise.shape != image.shape:
            raise ReconstructError(
                f"given_noise must match the init latents {tuple(image.shape)}, got "
                f"{None if self.given_noise is None else tuple(self.given_noise.shape)}"
            )
        init_latents = image.to(device=device, dtype=dtype)
        noise = self.given_noise.to(device=device, dtype=dtype)
        return add_noise(self.scheduler, init_latents, noise, timestep)


def load_reference_pipeline(model_path: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> GivenNoiseImg2ImgPipeline:
    """The img2img reference pipeline with a DDIM scheduler (eta 0), on ``device`` in ``dtype``."""
    from brainldm.train.ldm.image_model import load_image_model

    base = load_image_model(model_path, device=str(device), dtype=dtype)
    components = dict(base.components)
    components["scheduler"] = DDIMScheduler.from_config(base.scheduler.config)
    # safety_checker is None: saying so keeps diffusers from printing its notice about it
    pipe = GivenNoiseImg2ImgPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reencode_latents(pipe, z: torch.Tensor, resolution: int, posterior_noise: torch.Tensor | None) -> torch.Tensor:
    """Decode ``z`` to an image, resize to ``resolution``, encode it again.

    Args:
        z: (B, C, h, w) latents, already multiplied by the scaling factor, on the VAE's device and dtype.
        resolution: generation resolution in px.
        posterior_noise: (B, C, R/f, R/f) standard normal noise for the posterior sample (as ``z``),
            or None for the posterior mean.
    Returns:
        (B, C, R/f, R/f) latents times the scaling factor, in the VAE's dtype.
    """
    scaling = pipe.vae.config.scaling_factor
    image = pipe.vae.decode(z / scaling).sample.clamp(-1, 1)
    if image.shape[-1] != resolution:
        image = torch.nn.functional.interpolate(image, size=(resolution, resolution), mode="bicubic", align_corners=False)
        image = image.clamp(-1, 1)
    posterior = pipe.vae.encode(image).latent_dist
    latents = posterior.mean if posterior_noise is None else posterior.mean + posterior.std * posterior_noise
    return latents * scaling


def native_resolution(pipe) -> int:
    """The model's native image size in px (UNet sample size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def reconstruct_batch(
    pipe: GivenNoiseImg2ImgPipeline,
    z: np.ndarray,
    c: np.ndarray,
    uncond: np.ndarray,
    items: np.ndarray,
    samples: np.ndarray,
    cfg: ReconstructConfig,
) -> np.ndarray:
    """Reconstruct one batch of (test item, sample) pairs.

    Args:
        z: (B, C, h, w) float32 predicted latents (x scaling factor).
        c: (B, T, D) float32 predicted text states; uncond: (T, D) empty-prompt states.
        items, samples: (B,) int test-item and sample indices (they seed the noise).
    Returns:
        images (B, R, R, 3) float32 in [0, 1]. The inputs and noise go to the pipeline's device and
        dtype (load_reference_pipeline); on CPU in float32 those moves are no-ops.
    """
    where = dict(device=pipe.unet.device, dtype=pipe.unet.dtype)
    # 1. Decode z, resize to the generation resolution and encode again.
    resolution = cfg.resolution or native_resolution(pipe)
    factor = int(pipe.vae_scale_factor)
    latent_shape = (z.shape[1], resolution // factor, resolution // factor)
    posterior_noise = None
    if cfg.encode_mode == "sample":
        posterior_noise = torch.from_numpy(np.stack([
            numpy_noise(cfg.seed, int(i), int(s), NOISE_STREAM_POSTERIOR, latent_shape) for i, s in zip(items, samples)
        ])).to(**where)
    init_latents = reencode_latents(pipe, torch.from_numpy(z).to(**where), resolution, posterior_noise)
    # 2. Forward-diffusion noise, drawn with numpy so that the runtime can draw the same.
    pipe.given_noise = torch.from_numpy(np.stack([
        numpy_noise(cfg.seed, int(i), int(s), NOISE_STREAM_DIFFUSION, latent_shape) for i, s in zip(items, samples)
    ])).to(**where)
    # 3. img2img: DDIM from the strength's start step, CFG with the empty-prompt embedding.
    negative = torch.from_numpy(np.broadcast_to(uncond, c.shape).copy()).to(**where)
    out = pipe(
        image=init_latents,
        prompt_embeds=torch.from_numpy(c).to(**where),
        negative_prompt_embeds=negative,
        strength=cfg.strength,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        eta=0.0,
        output_type="np",
    )
    return np.asarray(out.images, dtype=np.float32)


def load_predictions(cfg: ReconstructConfig, dataset: str, pair: PairConfig) -> dict[str, np.ndarray]:
    """Predicted z and c of the test split, aligned by test image, plus the unconditional states.

    Returns a dict: z (n, C, h, w), c (n, T, D), uncond (T, D) float32; image_index (n,) int64.
    """
    arrays = {}
    for key, decoder in (("z", pair.z), ("c", pair.c)):
        arrays[key], arrays[f"{key}_index"] = _test_rows(cfg, dataset, key, decoder)
    if not np.array_equal(arrays["z_index"], arrays["c_index"]):
        raise ReconstructError(
            f"z predictions ({pair.z}) and c predictions ({pair.c}) cover different test images: "
            f"{len(arrays['z_index'])} vs {len(arrays['c_index'])} items or a different order"
        )
    targets = Path(cfg.targets_dir) / f"{dataset}.h5"
    if not targets.is_file():
        raise ReconstructError(f"missing targets file {targets} (it holds the unconditional embedding); run targets first")
    with h5py.File(targets, "r") as f:
        uncond = f["uncond"][()].astype(np.float32)
    z, c = arrays["z"], arrays["c"]
    if z.ndim != 4 or c.ndim != 3 or c.shape[1:] != uncond.shape:
        raise ReconstructError(
            f"expected z (n, C, h, w) and c (n, T, D) with (T, D) = uncond {uncond.shape}; got z {z.shape}, c {c.shape}"
        )
    return {"z": z, "c": c, "uncond": uncond, "image_index": arrays["z_index"]}


def _test_rows(cfg: ReconstructConfig, dataset: str, key: str, decoder: str) -> tuple[np.ndarray, np.ndarray]:
    """One target's test rows (n, ...) float32 and their image rows (n,) int64: a decoder's
    predictions, or for TRUE_TARGETS the test images' own targets (the ceiling)."""
    if decoder == TRUE_TARGETS:
        index = split_image_index(Path(cfg.prepared_dir) / f"{dataset}.h5", "test")
        return load_targets(Path(cfg.targets_dir) / f"{dataset}.h5", key, index), index
    path = Path(cfg.decode_dir) / dataset / f"{decoder}.h5"
    if not path.is_file():
        raise ReconstructError(f"missing predictions {path} (decoder '{decoder}' for {key}); run the decode stage first")
    with h5py.File(path, "r") as f:
        return f["pred"][()].astype(np.float32), f["image_index"][()].astype(np.int64)


def check_model_fits(pipe, z: np.ndarray, c: np.ndarray) -> None:
    """Clear errors when the predictions do not fit the image model."""
    channels = int(pipe.vae.config.latent_channels)
    if z.shape[1] != channels:
        raise ReconstructError(f"predicted z has {z.shape[1]} channels but the model's VAE expects {channels}")
    width = int(pipe.unet.config.cross_attention_dim)
    if c.shape[2] != width:
        raise ReconstructError(f"predicted c has width {c.shape[2]} but the UNet's cross-attention expects {width}")


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def run(cfg: ReconstructConfig, dataset: str, pair: str) -> Path:
    """Reconstruct every test image ``cfg.samples`` times; returns the output folder.

    Writes ``<out_dir>/<dataset>/<pair>/`` with ``item{i:04d}_s{k}.png`` and ``index.csv``
    (test item, image index, sample, file), atomically as one folder.
    """
    if pair not in cfg.pairs:
        raise ConfigError(f"unknown pair '{pair}'; configured pairs: {sorted(cfg.pairs)}")
    check_encode_mode(cfg.encode_mode, "reconstruct.encode_mode")
    device, dtype = stage_device_dtype("reconstruct", cfg.device, cfg.dtype)
    cfg = replace(cfg, device=device.type)  # "auto" resolved: config.json records what ran
    # 1. Inputs and model.
    pred = load_predictions(cfg, dataset, cfg.pairs[pair])
    pipe = load_reference_pipeline(cfg.model, device, dtype)
    check_model_fits(pipe, pred["z"], pred["c"])
    # 2. All (test item, sample) pairs, in batches.
    items, samples = np.divmod(np.arange(len(pred["z"]) * cfg.samples), cfg.samples)
    out = Path(cfg.out_dir) / dataset / pair
    rows = []
    with atomic_path(out, suffix="") as tmp:
        tmp.mkdir()
        for start in tqdm(range(0, len(items), cfg.batch_size), desc=f"reconstruct {dataset}/{pair}", unit="batch"):
            it, sa = items[start:start + cfg.batch_size], samples[start:start + cfg.batch_size]
            images = reconstruct_batch(pipe, pred["z"][it], pred["c"][it], pred["uncond"], it, sa, cfg)
            for i, s, image in zip(it, sa, images):
                name = f"item{i:04d}_s{s}.png"
                (tmp / name).write_bytes(_png_bytes(image))
                rows.append((int(i), int(pred["image_index"][i]), int(s), name))
        # 3. Index and the resolved config next to the images.
        with open(tmp / "index.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["test_item", "image_index", "sample", "file"])
            writer.writerows(rows)
        (tmp / "config.json").write_text(json.dumps({"dataset": dataset, "pair": pair, "config": config_to_record(cfg)}, indent=2, sort_keys=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--pair", required=True, help="a key of reconstruct.pairs, e.g. ours or baseline")
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_config(ReconstructConfig, "reconstruct", args.params)
        torch.manual_seed(cfg.seed)
        return f"wrote {run(cfg, args.dataset, args.pair)}"
    return run_stage(work)


if __name__ == "__main__":
    sys.exit(main())
