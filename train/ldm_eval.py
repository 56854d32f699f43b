"""Held-out evaluation of the ``train_ldm`` stage's model (step 5 of that stage).

VAE round trip, img2img from the true z and c (as the reconstruction stage runs it), and
img2img with each image's captions swapped for another's, on scenes from another seed.
Metrics follow the MindEye convention (``train.metrics``: PixCorr and SSIM at 425 px;
docs/data-formats.md, "Evaluation definitions").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from brainldm.runtime.generation import to_uint8
from brainldm.train import scenes
from brainldm.train.metrics import pixcorr, ssim
from brainldm.train.targets import TargetsConfig, encode_texts
from brainldm.train.distributed import resolve_device
from brainldm.train.train_ldm import EvalConfig, TrainLdmConfig, to_tensor


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


def img2img(pipe, z: torch.Tensor, c: torch.Tensor, uncond: torch.Tensor, cfg: EvalConfig) -> np.ndarray:
    """Reconstruct from scaled latents z (N, C, h, w), c (N, 77, D) and uncond (77, D); returns (N, S, S, 3) uint8."""
    out = []
    for s in range(0, len(z), cfg.batch_size):
        zb, cb = z[s:s + cfg.batch_size], c[s:s + cfg.batch_size]
        images = pipe(prompt_embeds=cb, negative_prompt_embeds=uncond.expand_as(cb), image=zb,
                      strength=cfg.strength, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                      generator=torch.Generator(pipe.device).manual_seed(cfg.seed + s), output_type="np").images
        out.append(to_uint8(images))
    return np.concatenate(out)


@torch.no_grad()
def evaluate(cfg: TrainLdmConfig) -> dict:
    """Held-out metrics of the saved model ``cfg.out`` (scenes from ``cfg.eval.seed``)."""
    from brainldm.train.image_model import load_image_model

    if cfg.eval.seed == cfg.seed:
        raise ValueError("train_ldm.eval.seed must differ from train_ldm.seed (held-out scenes)")
    # 1. Held-out scenes and the model.
    gt, captions, labels, scene_list = scenes.generate(cfg.eval.n_images, cfg.eval.seed, cfg.image_size, cfg.n_captions)
    pipe = load_image_model(cfg.out, device=str(resolve_device(cfg.device, "train_ldm.device")))
    x = to_tensor(gt).to(pipe.device)
    # 2. VAE round trip through the posterior mean.
    z = torch.cat([pipe.vae.encode(x[s:s + cfg.eval.batch_size]).latent_dist.mean for s in range(0, len(x), cfg.eval.batch_size)])
    recon = pipe.vae.decode(z).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    # 3. img2img from true z and c, then with each image's captions swapped for another's.
    z = z * pipe.vae.config.scaling_factor
    c, uncond = (torch.from_numpy(a).to(pipe.device) for a in encode_texts(pipe, captions, TargetsConfig()))
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
