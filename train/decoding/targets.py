"""Stage ``targets``: the decoding targets z (VAE latents) and c (text states) of every image.

Reads ``<prepared_dir>/<dataset>.h5`` (``images`` (N, H, W, 3) uint8, ``captions``
(N,) JSON lists; docs/prepared_schema.md) and writes ``<targets_dir>/<dataset>.h5``:

| path | shape / type | meaning |
|---|---|---|
| ``z`` | (N, C, R/f, R/f) float32 | VAE posterior mean (``latent: mean``) or sample of the image resized to R (LANCZOS, [-1, 1]) x scaling_factor |
| ``z_mean`` | (N, C, R/f, R/f) float32 | the posterior mean x scaling_factor: equal to ``z`` when ``latent: mean``; the perfect predictor of either (Table 3's ceiling) |
| ``c`` | (N, T, D) float32 | text-encoder ``last_hidden_state`` (first T of 77 tokens), mean over the image's captions |
| ``uncond`` | (T, D) float32 | the same for the empty prompt (CFG's unconditional branch) |
| attrs | | ``format_version``, ``config`` (JSON), ``scaling_factor``, ``latent``, ``model``, ``dataset``, ``constant_bos`` |

Row i of z and c belongs to row i of the prepared ``images``. With T < 77 (the
original project's 15) token 0 is the BOS state, identical for every prompt because
the CLIP text encoder is causal: it is stored as the empty prompt's BOS state exactly,
and decoders need only predict tokens 1..T-1.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path
from brainldm.train.config import config_to_json, load_config, run_stage

FORMAT_VERSION = 1
CONTEXT_LENGTH = 77  # CLIP's context: prompts are always encoded at full length, as SD does


@dataclass(frozen=True)
class TargetsConfig:
    model: str = "models/ldm"
    single_file_config: str | None = None
    resolution: int = 64
    n_tokens: int = 77
    latent: str = "mean"
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"


def validate(cfg: TargetsConfig) -> None:
    """Raise ValueError for out-of-range settings."""
    if cfg.latent not in ("sample", "mean"):
        raise ValueError(f"targets.latent: got {cfg.latent!r}, expected 'sample' or 'mean'")
    if not 1 <= cfg.n_tokens <= CONTEXT_LENGTH:
        raise ValueError(f"targets.n_tokens: got {cfg.n_tokens}, expected 1..{CONTEXT_LENGTH}")
    if cfg.resolution < 8 or cfg.batch_size < 1:
        raise ValueError(f"targets: need resolution >= 8 and batch_size >= 1, got {cfg.resolution}, {cfg.batch_size}")


def read_prepared(path: Path) -> tuple[h5py.File, list[list[str]]]:
    """Open a prepared file; return (file, captions per image). Checks ``images`` and ``captions``."""
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {path} (run the prepare stage first)")
    f = h5py.File(path, "r")
    try:
        images = f.get("images")
        if images is None or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            got = None if images is None else (images.shape, images.dtype)
            raise ValueError(f"{path}: 'images' must be (N, H, W, 3) uint8, got {got}")
        if "captions" not in f or f["captions"].shape != (images.shape[0],):
            raise ValueError(f"{path}: 'captions' must be ({images.shape[0]},) JSON lists, one per image")
        captions = [_parse_captions(path, i, raw) for i, raw in enumerate(f["captions"][()])]
    except Exception:
        f.close()
        raise
    return f, captions


def _parse_captions(path: Path, row: int, raw) -> list[str]:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    try:
        caps = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: captions[{row}] is not a JSON list ({exc})") from exc
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"{path}: captions[{row}] must be a non-empty JSON list of strings, got {text[:80]!r}")
    return caps


def load_components(cfg: TargetsConfig):
    """The img2img pipeline of ``cfg.model``, checked for matching latent channels."""
    from brainldm.train.ldm.image_model import ImageModelError, load_image_model

    pipe = load_image_model(cfg.model, config=cfg.single_file_config, device=cfg.device)
    channels, unet_in = pipe.vae.config.latent_channels, pipe.unet.config.in_channels
    if channels != unet_in:
        raise ImageModelError(f"{cfg.model}: vae latent_channels={channels} but unet in_channels={unet_in}")
    return pipe


def encode_images(pipe, images: h5py.Dataset, cfg: TargetsConfig):
    """z, z_mean (N, C, R/f, R/f) float32 and the scaling factor: images resized (LANCZOS) to R,
    in [-1, 1]; z = posterior sample or mean (``cfg.latent``) x scaling_factor, z_mean = the
    posterior mean x scaling_factor (the best any predictor of the image can do: Table 3's ceiling).

    The posterior noise of image i is drawn from its own seeded stream, so z does not
    depend on the batch size.
    """
    import torch
    from PIL import Image

    from brainldm.train.ldm.image_model import pixels_to_vae

    sf = float(pipe.vae.config.scaling_factor)
    out, means = [], []
    for start in tqdm(range(0, len(images), cfg.batch_size), desc="z", mininterval=5):
        batch = images[start:start + cfg.batch_size]
        resized = np.stack([np.asarray(Image.fromarray(im).resize((cfg.resolution,) * 2, Image.LANCZOS)) for im in batch])
        x = pixels_to_vae(resized).to(pipe.device)
        with torch.no_grad():
            dist = pipe.vae.encode(x).latent_dist
        z = dist.mean
        means.append((z * sf).float().cpu().numpy())
        if cfg.latent == "sample":
            eps = np.stack([np.random.default_rng([cfg.seed, start + i]).standard_normal(z.shape[1:]) for i in range(len(z))])
            z = z + dist.std * torch.from_numpy(eps.astype(np.float32)).to(z.device)
        out.append((z * sf).float().cpu().numpy())
    return np.concatenate(out), np.concatenate(means), sf


def encode_texts(pipe, captions: list[list[str]], cfg: TargetsConfig) -> tuple[np.ndarray, np.ndarray]:
    """c (N, T, D) float32 (mean over captions) and uncond (T, D) float32 (empty prompt)."""
    import torch

    def states(texts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                             return_tensors="pt").input_ids.to(pipe.device)
        with torch.no_grad():
            return pipe.text_encoder(ids).last_hidden_state[:, :cfg.n_tokens].float().cpu()

    uncond = states([""])[0].numpy()
    out = []
    for start in tqdm(range(0, len(captions), cfg.batch_size), desc="c", mininterval=5):
        chunk = captions[start:start + cfg.batch_size]
        flat = states([c for caps in chunk for c in caps])
        bounds = np.cumsum([0] + [len(caps) for caps in chunk])
        out.extend(flat[a:b].mean(0).numpy() for a, b in zip(bounds[:-1], bounds[1:]))
    c = np.stack(out).astype(np.float32)
    # Causal attention: token 0 sees only BOS, so its state is one constant; store it exactly.
    c[:, 0] = uncond[0]
    return c, uncond.astype(np.float32)


def run(cfg: TargetsConfig, dataset: str) -> Path:
    """Compute z, c, uncond for ``dataset`` and write ``<targets_dir>/<dataset>.h5`` atomically."""
    validate(cfg)
    src = Path(cfg.prepared_dir) / f"{dataset}.h5"
    dst = Path(cfg.targets_dir) / f"{dataset}.h5"
    # 1. Inputs first, so bad input fails before the model is loaded or anything is written.
    f, captions = read_prepared(src)
    with f:
        pipe = load_components(cfg)
        # 2. Latents and text states.
        z, z_mean, sf = encode_images(pipe, f["images"], cfg)
        c, uncond = encode_texts(pipe, captions, cfg)
    # 3. One atomic write.
    with atomic_path(dst) as tmp:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("z", data=z)
            out.create_dataset("z_mean", data=z_mean)
            out.create_dataset("c", data=c)
            out.create_dataset("uncond", data=uncond)
            out.attrs.update(format_version=FORMAT_VERSION, config=config_to_json(cfg), scaling_factor=sf,
                             latent=cfg.latent, model=str(cfg.model), dataset=dataset, constant_bos=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True, help="name of data/prepared/<dataset>.h5")
    args = parser.parse_args(argv)
    return run_stage(lambda: f"wrote {run(load_config(TargetsConfig, 'targets', args.params), args.dataset)}")


if __name__ == "__main__":
    sys.exit(main())
