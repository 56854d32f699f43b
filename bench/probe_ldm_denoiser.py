"""Where img2img at strength 0.8 loses the image: probe a trained small LDM on held-out scenes.

For noise levels t and guidance scales w, the one-step estimate
x0_hat = (z_t - sqrt(1 - abar_t) eps_w) / sqrt(abar_t), eps_w = eps_u + w (eps_c - eps_u),
decoded and compared with the stimulus (PixCorr), next to full img2img (strength 0.8,
50 DDIM steps) at several w. Not a test: a diagnostic whose numbers go into the issue notes.

    python bench/probe_ldm_denoiser.py --model models/ldm --label versioned
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.ldm import held_out as E
from brainldm.train.simulation import scenes
from brainldm.train.ldm import train_ldm as T
from brainldm.train.config import load_config
from brainldm.train.ldm.image_model import load_image_model, pixels_to_vae, vae_to_uint8
from brainldm.train.decoding.targets import TargetsConfig, encode_texts
from brainldm.train.reconstruction.reconstruct import load_reference_pipeline

DEFAULT_OUT = Path("bench/results/probe_ldm_denoiser.json")


def decode_uint8(pipe, latents: torch.Tensor):
    """Scaled latents (N, C, h, w) -> images (N, S, S, 3) uint8, as the pipelines quantise them."""
    return vae_to_uint8(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)


@torch.no_grad()
def probe(model: str, n_images: int, timesteps: list[int], scales: list[float]) -> dict:
    cfg = load_config(T.TrainLdmConfig, "train_ldm", "params.yaml")
    # 1. Held-out scenes (train_ldm's eval seed), their z (posterior mean x scaling) and mean-caption c.
    gt, captions, _, _ = scenes.generate(n_images, cfg.eval.seed, cfg.image_size, cfg.n_captions)
    pipe = load_image_model(model, device="cpu")
    z = pipe.vae.encode(pixels_to_vae(gt)).latent_dist.mean * pipe.vae.config.scaling_factor
    c, uncond = (torch.from_numpy(a) for a in encode_texts(pipe, captions, TargetsConfig()))
    uncond = uncond.expand(n_images, -1, -1)
    abar = pipe.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    out = {"model": model, "latent_channels": int(z.shape[1]), "n_images": n_images, "x0_hat_pixcorr": {}}
    # 2. One-step x0 estimates.
    for t in timesteps:
        eps = torch.randn(z.shape, generator=gen)
        z_t = pipe.scheduler.add_noise(z, eps, torch.tensor([t]))
        eps_c = pipe.unet(z_t, t, encoder_hidden_states=c).sample
        eps_u = pipe.unet(z_t, t, encoder_hidden_states=uncond).sample
        for w in scales:
            x0 = (z_t - (1 - abar[t]).sqrt() * (eps_u + w * (eps_c - eps_u))) / abar[t].sqrt()
            out["x0_hat_pixcorr"][f"t{t}_w{w:g}"] = E.mean_pixcorr(gt, decode_uint8(pipe, x0))
    # 3. Full img2img as the train_ldm stage runs it, at each guidance scale.
    reference = load_reference_pipeline(model)
    out["img2img_pixcorr"] = {f"w{w:g}": E.mean_pixcorr(gt, E.img2img(
        reference, z.numpy(), c.numpy(), uncond[0].numpy(), dataclasses.replace(cfg.eval, guidance=w)))
        for w in scales + [3.0]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/ldm")
    parser.add_argument("--label", required=True, help="result key, e.g. versioned")
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = probe(args.model, args.n_images, [781, 601, 401], [1.0, 5.0])
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.label] = result
    write_text_atomic(args.out, json.dumps(results, indent=1, sort_keys=True))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
