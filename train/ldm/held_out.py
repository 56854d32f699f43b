"""Held-out evaluation of the ``train_ldm`` stage's model (step 5 of that stage).

VAE round trip, img2img from the true z and c (the reconstruction stage's ``reconstruct_batch``), and
img2img with each image's captions swapped for another's, on scenes from another seed.
Metrics follow the MindEye convention (``train.metrics``: PixCorr and SSIM at 425 px;
docs/data-formats.md, "Evaluation definitions").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brainldm.runtime.generation import to_uint8
from brainldm.train.simulation import scenes
from brainldm.train.evaluation.metrics import pixcorr, ssim
from brainldm.train.decoding.targets import TargetsConfig, encode_texts
from brainldm.train.distributed import resolve_device
from brainldm.train.ldm.image_model import pixels_to_vae, vae_to_uint8
from brainldm.train.ldm.train_ldm import EvalConfig, TrainLdmConfig
from brainldm.train.reconstruction.reconstruct import (ReconstructConfig, check_encode_mode, load_reference_pipeline,
                                                       reconstruct_batch)


def mean_pixcorr(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean PixCorr over images; gt, pred (N, H, W, 3) uint8."""
    return float(np.mean(pixcorr(gt, pred)))


def mean_ssim(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean SSIM over images; gt, pred (N, H, W, 3) uint8."""
    return float(np.mean(ssim(gt, pred)))


def main_colour_accuracy(images: np.ndarray, scene_list: list, labels: np.ndarray) -> float:
    """Fraction of images whose mean colour on the main object's visible pixels is nearest
    (RGB distance) to palette colour ``labels`` (n,) int64. images (n, S, S, 3) uint8."""
    size = images.shape[1]
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    palette = np.array(list(scenes.COLOURS.values()), dtype=np.float64)
    hits = []
    for image, scene, label in zip(images, scene_list, labels):
        mask = scenes.shape_mask(scene.objects[0], xx, yy)
        for other in scene.objects[1:]:
            mask &= ~scenes.shape_mask(other, xx, yy)
        mean = image[mask].astype(np.float64).mean(0) if mask.any() else np.zeros(3)
        hits.append(np.argmin(((palette - mean) ** 2).sum(1)) == label)
    return float(np.mean(hits))


def img2img(pipe, z: np.ndarray, c: np.ndarray, uncond: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """Reconstruct each image from its own z as the ``reconstruct`` stage does: ``reconstruct_batch``
    (decode, re-encode, numpy noise keyed by (cfg.seed, image index, sample 0)), so the true-caption
    and swapped-caption runs of one image share their noise.

    z: (N, C, h, w) float32 scaled latents; c: (N, T, D) float32; uncond: (T, D). Returns (N, S, S, 3) uint8.
    """
    settings = ReconstructConfig(steps=cfg.steps, strength=cfg.strength, guidance=cfg.guidance, resolution=0,
                                 encode_mode=cfg.encode_mode, seed=cfg.seed, batch_size=cfg.batch_size)
    out = []
    for start in tqdm(range(0, len(z), cfg.batch_size), desc="held-out img2img", mininterval=5):
        items = np.arange(start, min(start + cfg.batch_size, len(z)))
        images = reconstruct_batch(pipe, z[items], c[items], uncond, items, np.zeros_like(items), settings)
        out.append(to_uint8(images))
    return np.concatenate(out)


@torch.no_grad()
def evaluate(cfg: TrainLdmConfig) -> dict:
    """Held-out metrics of the saved model ``cfg.out`` (scenes from ``cfg.eval.seed``)."""
    if cfg.eval.seed == cfg.seed:
        raise ValueError("train_ldm.eval.seed must differ from train_ldm.seed (held-out scenes)")
    check_encode_mode(cfg.eval.encode_mode, "train_ldm.eval.encode_mode")
    # 1. Held-out scenes and the model.
    gt, captions, labels, scene_list = scenes.generate(cfg.eval.n_images, cfg.eval.seed, cfg.image_size, cfg.n_captions)
    pipe = load_reference_pipeline(cfg.out, device=resolve_device(cfg.device, "train_ldm.device"))
    x = pixels_to_vae(gt).to(pipe.device)
    # 2. VAE round trip through the posterior mean.
    z = torch.cat([pipe.vae.encode(x[s:s + cfg.eval.batch_size]).latent_dist.mean for s in range(0, len(x), cfg.eval.batch_size)])
    recon = vae_to_uint8(pipe.vae.decode(z).sample)
    # 3. img2img from true z and c, then with each image's captions swapped for another's.
    z = (z * pipe.vae.config.scaling_factor).cpu().numpy()
    c, uncond = encode_texts(pipe, captions, TargetsConfig())
    true = img2img(pipe, z, c, uncond, cfg.eval)
    order = swap_order(labels["colour"])
    swapped = img2img(pipe, z, c[order], uncond, cfg.eval)
    return {
        "n_images": len(gt), "eval_seed": cfg.eval.seed,
        "vae_pixcorr": mean_pixcorr(gt, recon), "vae_ssim": mean_ssim(gt, recon),
        "img2img_pixcorr": mean_pixcorr(gt, true), "img2img_ssim": mean_ssim(gt, true),
        "img2img_colour_acc": main_colour_accuracy(true, scene_list, labels["colour"]),
        "swapped_pixcorr": mean_pixcorr(gt, swapped), "swapped_ssim": mean_ssim(gt, swapped),
        "swapped_colour_acc": main_colour_accuracy(swapped, scene_list, labels["colour"]),
        "swapped_colour_acc_vs_donor": main_colour_accuracy(swapped, scene_list, labels["colour"][order]),
        "gt_colour_acc": main_colour_accuracy(gt, scene_list, labels["colour"]),
    }


def swap_order(colours: np.ndarray) -> np.ndarray:
    """For each image, the next image (cyclically) whose main colour differs (a caption donor)."""
    n = len(colours)
    order = np.arange(n)
    for i in range(n):
        order[i] = next(((i + k) % n for k in range(1, n) if colours[(i + k) % n] != colours[i]), (i + 1) % n)
    return order


def folder_megabytes(folder: str | Path, exclude: tuple[str, ...] = ("metrics.json",)) -> float:
    """Total size in MB (1e6 bytes) of the files under ``folder`` except those named in ``exclude``
    (the metrics file written into the model folder, so that re-evaluating gives the same size)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.name not in exclude) / 1e6
