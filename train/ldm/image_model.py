"""One loader for every image model: the small LDM or a real SD v1.x, offline.

Accepted inputs:

- a diffusers folder (``model_index.json``, ``vae/``, ``unet/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``): this project's small LDM or a copied SD v1.4/1.5;
- a single ``.ckpt`` / ``.safetensors`` SD v1.x checkpoint plus a local diffusers
  config folder (the same layout without weights is enough), via diffusers'
  ``from_single_file(..., config=folder, local_files_only=True)``.

Nothing here ever reaches a model hub: ``HF_HUB_OFFLINE`` is set and every call
passes ``local_files_only=True``. The helpers at the bottom read the latent
geometry from the saved configs, so no other module hard-codes 8, 4 or 0.18215.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from brainldm.runtime.generation import to_uint8

SD_V1_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default, used when a config omits it
COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
LAYOUT_HELP = (
    "expected a diffusers folder holding model_index.json and the sub-folders "
    "vae/, unet/, text_encoder/, tokenizer/, scheduler/ (each with its config and weights), "
    "or a single SD v1.x .ckpt/.safetensors file with config=<such a folder>. "
    "To obtain SD v1.4: on a machine with network run "
    "`huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir sd-v1-4` "
    "(or `hf download ...`), then copy that folder here and point the params at it; "
    "or train the small LDM with `python -m brainldm.train.ldm.train_ldm`."
)


def pixels_to_vae(images: np.ndarray):
    """The VAE's input convention (SD's): uint8 (N, H, W, 3) -> float32 torch tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def vae_to_uint8(decoded) -> np.ndarray:
    """A VAE decoder's output (N, 3, H, W) torch tensor, ~[-1, 1] -> uint8 (N, H, W, 3): diffusers'
    postprocess (x / 2 + 0.5, clamped to [0, 1]), then the runtime's quantisation (``to_uint8``)."""
    return to_uint8((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())


class ImageModelError(FileNotFoundError):
    """The image model is missing or malformed (message gives the expected layout)."""


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


def check_folder(folder: str | Path, components: tuple[str, ...] = COMPONENTS) -> Path:
    """Raise :class:`ImageModelError` unless ``folder`` has the diffusers layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageModelError(f"image model folder not found: {folder}; {LAYOUT_HELP}")
    missing = [n for n in ("model_index.json",) if not (folder / n).is_file()]
    missing += [f"{c}/" for c in components if not (folder / c).is_dir()]
    if missing:
        raise ImageModelError(f"image model folder {folder} lacks {missing}; {LAYOUT_HELP}")
    for name in components:
        if name == "tokenizer":
            continue
        config = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not config.is_file():
            raise ImageModelError(f"image model folder {folder}: {name}/ has no {config.name}; {LAYOUT_HELP}")
    return folder


def load_image_model(
    path: str | Path,
    config: str | Path | None = None,
    device: str = "cpu",
    dtype: Any = None,
    scheduler: str = "ddim",
):
    """Load an SD v1.x-style img2img pipeline from local files only.

    Args:
        path: a diffusers folder, or a single ``.ckpt``/``.safetensors`` file.
        config: for a single file, a local diffusers folder giving the component
            configs (and tokenizer); ignored for a folder.
        device: torch device for the pipeline.
        dtype: torch dtype (default float32).
        scheduler: "ddim" replaces the saved scheduler by a ``DDIMScheduler`` built
            from its config (same betas), as the reconstruction stage uses; "saved" keeps it.
    Returns:
        ``LatentImg2ImgPipeline``: diffusers' ``StableDiffusionImg2ImgPipeline`` that also takes
        latents of a VAE with other than 4 channels as ``image`` (safety checker off, progress bar off).
    Raises:
        ImageModelError: missing or malformed model (with the expected layout).
    """
    import torch
    from diffusers import DDIMScheduler

    from brainldm.train.reconstruction.img2img import LatentImg2ImgPipeline

    _offline()
    path = Path(path)
    dtype = dtype or torch.float32
    kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
            if config is None:
                raise ImageModelError(f"single-file model {path} needs config=<local diffusers folder>; {LAYOUT_HELP}")
            folder = check_folder(config)
            pipe = LatentImg2ImgPipeline.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **kwargs
            )
        else:
            # low_cpu_mem_usage=False is what diffusers falls back to without `accelerate` (not a
            # dependency), after printing a notice; asked for here, the same load prints nothing
            pipe = LatentImg2ImgPipeline.from_pretrained(
                str(check_folder(path)), local_files_only=True, dtype=dtype, low_cpu_mem_usage=False, **kwargs
            )
    except ImageModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        raise ImageModelError(f"could not load image model {path}: {exc}; {LAYOUT_HELP}") from exc
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _read_config(folder: str | Path, component: str) -> dict[str, Any]:
    file = Path(folder) / component / "config.json"
    if not file.is_file():
        raise ImageModelError(f"{file} not found; {LAYOUT_HELP}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ImageModelError(f"{file}: not valid JSON ({exc}); {LAYOUT_HELP}") from exc


def vae_scale_factor(folder: str | Path) -> int:
    """Pixels per latent cell: ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD)."""
    return 2 ** (len(_read_config(folder, "vae")["block_out_channels"]) - 1)


def latent_channels(folder: str | Path) -> int:
    """Channels of the VAE latent (4 for SD); must equal the UNet's ``in_channels``."""
    channels = int(_read_config(folder, "vae")["latent_channels"])
    unet_in = int(_read_config(folder, "unet")["in_channels"])
    if channels != unet_in:
        raise ImageModelError(
            f"{folder}: vae latent_channels={channels} but unet in_channels={unet_in}; they must match"
        )
    return channels


def scaling_factor(folder: str | Path) -> float:
    """The VAE latent ``scaling_factor`` saved in ``vae/config.json`` (0.18215 for SD v1.x)."""
    return float(_read_config(folder, "vae").get("scaling_factor", SD_V1_SCALING_FACTOR))


def text_geometry(folder: str | Path) -> tuple[int, int]:
    """(max tokens, hidden size) of the text encoder: (77, 768) for SD v1.x."""
    cfg = _read_config(folder, "text_encoder")
    return int(cfg["max_position_embeddings"]), int(cfg["hidden_size"])
