"""Stage ``train_ldm``: train the small latent diffusion model from SD v1.x's classes.

1. Procedural scenes (own seed) and a CLIP tokenizer built from their captions.
2. ``AutoencoderKL`` (reconstruction MSE + KL); ``scaling_factor`` = 1 / std of the
   training latents, as SD did, saved in the VAE config.
3. ``CLIPTextModel`` + ``UNet2DConditionModel`` trained jointly with the epsilon
   objective under SD's ``scaled_linear`` DDPM schedule, with caption dropout so that
   the empty prompt is the unconditional branch of classifier-free guidance.
4. Save a ``StableDiffusionImg2ImgPipeline`` folder (DDIM scheduler, same betas),
   the resolved config and the loss log.
5. Evaluate on held-out scenes (another seed): VAE round trip, img2img from the true
   z and c, and from the true z with another image's captions (c swapped).

Under ``torchrun --nproc_per_node N`` steps 2-3 run with DDP (train/distributed.py): every rank
draws the same global minibatch and noise and trains on its rows; rank 0 saves and evaluates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.train import distributed
from brainldm.train.simulation import scenes
from brainldm.train.config import config_to_dict, load_config, run_stage
from brainldm.train.ldm.image_model import pixels_to_vae
from brainldm.train.ldm.tokenizer import build_tokenizer, save_tokenizer

# SD v1.x's noise schedule (the UNet learns under it; DDIM at inference reuses it).
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
TOKENIZER_LENGTH = 77


@dataclass(frozen=True)
class VaeConfig:
    """AutoencoderKL size (4 levels = SD's f = 8) and its training."""

    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    kl_weight: float = 1e-6
    # SD's mid block has a self-attention layer; at f = 2 it attends over 1,024 cells and
    # costs ~30% of a CPU training step, so it can be left out.
    mid_block_add_attention: bool = True
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3


@dataclass(frozen=True)
class TextConfig:
    """CLIPTextModel size (context fixed at 77 tokens, as SD v1.x)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4


@dataclass(frozen=True)
class UnetConfig:
    """UNet2DConditionModel size and the joint text+UNet training."""

    block_out_channels: tuple[int, ...] = (64, 128)
    # diffusers' block names per level, high resolution first; the up path mirrors them.
    # Empty = SD's rule: cross-attention at every level but the lowest.
    down_block_types: tuple[str, ...] = ()
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    caption_dropout: float = 0.1
    # Min-SNR-gamma loss weights (Hang et al. 2023); 0 = plain epsilon MSE.
    min_snr_gamma: float = 0.0
    # Exponential moving average of the text encoder + UNet weights saved instead of the
    # last iterate; 0 = off.
    ema_decay: float = 0.0


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: img2img as the reconstruction stage runs it."""

    n_images: int = 64
    seed: int = 20240
    strength: float = 0.8
    steps: int = 50
    guidance: float = 5.0
    encode_mode: str = "sample"  # the re-encoding's posterior "sample" or "mean", as reconstruct.encode_mode
    batch_size: int = 32


@dataclass(frozen=True)
class TrainLdmConfig:
    """The ``train_ldm`` section of params.yaml."""

    seed: int = 1234
    n_train: int = 4000
    image_size: int = 64
    n_captions: int = 5
    device: str = "auto"
    out: str = "models/ldm"
    metrics: str = "metrics/ldm.json"
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")


def unet_down_block_types(cfg: UnetConfig) -> tuple[str, ...]:
    """The UNet's down blocks, one per ``block_out_channels`` level (SD's rule when not configured)."""
    k = len(cfg.block_out_channels)
    if not cfg.down_block_types:
        return ("CrossAttnDownBlock2D",) * (k - 1) + ("DownBlock2D",)
    if len(cfg.down_block_types) != k or not set(cfg.down_block_types) <= set(DOWN_BLOCK_TYPES):
        raise ValueError(f"train_ldm.unet.down_block_types: got {list(cfg.down_block_types)}, expected "
                         f"{k} entries (one per block_out_channels level) from {list(DOWN_BLOCK_TYPES)}")
    return tuple(cfg.down_block_types)


def build_models(cfg: TrainLdmConfig, vocab_size: int, bos: int, eos: int):
    """Fresh (vae, text_encoder, unet) of SD v1.x's classes at the configured size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n_levels = len(cfg.vae.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels, block_out_channels=cfg.vae.block_out_channels,
        latent_channels=cfg.vae.latent_channels, layers_per_block=cfg.vae.layers_per_block,
        norm_num_groups=cfg.vae.norm_num_groups, sample_size=cfg.image_size,
        mid_block_add_attention=cfg.vae.mid_block_add_attention,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text.hidden_size, intermediate_size=cfg.text.intermediate_size,
        num_hidden_layers=cfg.text.num_hidden_layers, num_attention_heads=cfg.text.num_attention_heads,
        max_position_embeddings=TOKENIZER_LENGTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    ))
    down = unet_down_block_types(cfg.unet)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (n_levels - 1), in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels, block_out_channels=cfg.unet.block_out_channels,
        down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        layers_per_block=cfg.unet.layers_per_block, cross_attention_dim=cfg.text.hidden_size,
        attention_head_dim=cfg.unet.attention_head_dim, norm_num_groups=cfg.unet.norm_num_groups,
    )
    return vae, text, unet


class VaeObjective(torch.nn.Module):
    """``(x (B, 3, H, W), eps (B, C, h, w)) ->`` train_vae's loss; a module, so DDP covers encoder and decoder."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return torch.nn.functional.mse_loss(recon, x) + self.kl_weight * posterior.kl().mean()


def train_vae(vae, images: torch.Tensor, cfg: VaeConfig, device: torch.device, gen: torch.Generator) -> list[float]:
    """Fit the autoencoder: MSE(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)). Returns losses per step
    (under DDP the mean over ranks, each training on its rows of the global batch)."""
    vae.to(device).train()
    objective = distributed.wrap(VaeObjective(vae, cfg.kl_weight), device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    side = images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)  # f = 2 per level but the last
    latent_shape = (cfg.batch_size, vae.config.latent_channels, side, side)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="vae", mininterval=5, disable=not distributed.is_main()):
        # the global batch's indices and noise on every rank (one generator stream); then this rank's rows
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        eps = torch.randn(latent_shape, generator=gen)
        loss = objective(images[distributed.shard(idx)].to(device), distributed.shard(eps).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(distributed.mean_across(loss))
    return losses


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of q(z|x), each (N, C, H/f, W/f) float32 on the CPU."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(images[start:start + batch].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> float:
    """SD's rule: 1 / std of posterior samples of the training images (unit-variance latents)."""
    sample = mean + std * torch.randn(mean.shape, generator=gen)
    return float(1.0 / sample.flatten().std())


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids (B, 77) int64, padded/truncated to the CLIP context."""
    return tokenizer(texts, padding="max_length", max_length=TOKENIZER_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def denoising_loss(pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, noise_sched, gamma: float) -> tuple[torch.Tensor, float]:
    """Epsilon loss, Min-SNR-gamma weighted when gamma > 0, and the plain MSE (for the log).

    L = mean_b w_b ||eps_b - eps_theta_b||^2 / D, w_b = min(SNR(t_b), gamma) / SNR(t_b),
    SNR(t) = abar_t / (1 - abar_t). pred, eps (B, C, h, w); t (B,) int64.
    """
    from diffusers.training_utils import compute_snr

    if gamma <= 0:
        loss = torch.nn.functional.mse_loss(pred, eps)
        return loss, float(loss.detach())
    per_sample = (pred - eps).pow(2).flatten(1).mean(1)
    plain = float(per_sample.mean())
    snr = compute_snr(noise_sched, t).to(per_sample.device)
    return (per_sample * snr.clamp(max=gamma) / snr).mean(), plain


class DenoiserObjective(torch.nn.Module):
    """``(ids (B, 77), zt, t (B,), eps (B, C, h, w)) -> denoising_loss``; a module, so DDP covers text and UNet."""

    def __init__(self, text, unet, noise_sched, gamma: float):
        super().__init__()
        self.text, self.unet, self.noise_sched, self.gamma = text, unet, noise_sched, gamma

    def forward(self, ids, zt, t, eps) -> tuple[torch.Tensor, float]:
        states = self.text(ids).last_hidden_state
        pred = self.unet(zt, t, encoder_hidden_states=states).sample
        return denoising_loss(pred, eps, t.cpu(), self.noise_sched, self.gamma)


def train_denoiser(text, unet, latents: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor,
                   empty_ids: torch.Tensor, sf: float, cfg: UnetConfig, device: torch.device,
                   gen: torch.Generator) -> list[float]:
    """Joint epsilon-prediction training of text encoder and UNet.

    latents: posterior (mean, std), each (N, C, h, w); token_ids (N, K, 77): K captions
    per image; empty_ids (77,): the empty caption (used with prob ``caption_dropout``).
    Loss ||eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c)||^2, z0 = sf * sample,
    see ``denoising_loss``. With ``ema_decay`` > 0 the models end holding the EMA weights.
    Returns the plain MSE per step (under DDP the mean over ranks, each on its rows of the global batch).
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_sched = DDPMScheduler(**SCHEDULE)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    text.to(device).train()
    unet.to(device).train()
    objective = distributed.wrap(DenoiserObjective(text, unet, noise_sched, cfg.min_snr_gamma), device)
    mean, std = latents
    n, k = token_ids.shape[:2]
    losses = []
    for _ in tqdm(range(cfg.steps), desc="unet", mininterval=5, disable=not distributed.is_main()):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        z0 = sf * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen))
        ids = token_ids[idx, torch.randint(k, (cfg.batch_size,), generator=gen)]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        ids[drop] = empty_ids
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        zt = noise_sched.add_noise(z0, eps, t)
        # drawn for the global batch on every rank (one generator stream); this rank trains on its rows
        loss, plain = objective(*(distributed.shard(a).to(device) for a in (ids, zt, t, eps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(params)
        losses.append(distributed.mean_across(plain))
    if ema is not None:
        ema.copy_to(params)
    return losses


def save_pipeline(folder: Path, vae, text, tokenizer, unet) -> None:
    """Write a complete ``StableDiffusionImg2ImgPipeline`` folder (safetensors, DDIM scheduler)."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae.cpu().eval(), text_encoder=text.cpu().eval(), tokenizer=tokenizer, unet=unet.cpu().eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(tokenizer, folder / "tokenizer")


def run(cfg: TrainLdmConfig) -> dict:
    """Train all components and write the pipeline folder ``cfg.out`` atomically (rank 0 under torchrun).

    Returns the training record: losses per phase, seconds per phase, steps/s, sizes (every rank's the same).
    """
    device = distributed.resolve_device(cfg.device, "train_ldm.device")
    for part in ("vae", "unet"):
        distributed.check_shardable(getattr(cfg, part).batch_size, f"train_ldm.{part}.batch_size")
    distributed.join_process_group(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # 1. Data and tokenizer.
    images_u8, captions, _, _ = scenes.generate(cfg.n_train, cfg.seed, cfg.image_size, cfg.n_captions)
    images = pixels_to_vae(images_u8)
    tokenizer = build_tokenizer([c for caps in captions for c in caps])
    vae, text, unet = build_models(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    # 2. Autoencoder and latent scale.
    t0 = time.perf_counter()
    vae_losses = train_vae(vae, images, cfg.vae, device, gen)
    t_vae = time.perf_counter() - t0
    moments = encode_moments(vae, images, device)
    sf = latent_scaling_factor(*moments, gen)
    vae.register_to_config(scaling_factor=sf)
    vae.requires_grad_(False)
    # 3. Text encoder + UNet.
    token_ids = tokenize(tokenizer, [c for caps in captions for c in caps]).view(len(captions), cfg.n_captions, -1)
    t0 = time.perf_counter()
    unet_losses = train_denoiser(text, unet, moments, token_ids, tokenize(tokenizer, [""])[0], sf, cfg.unet, device, gen)
    t_unet = time.perf_counter() - t0
    record = {
        "device": str(device), "scaling_factor": sf,
        **({"world_size": distributed.world_size()} if distributed.world_size() > 1 else {}),
        "vae": {"seconds": t_vae, "steps_per_s": cfg.vae.steps / max(t_vae, 1e-9), "losses": vae_losses},
        "unet": {"seconds": t_unet, "steps_per_s": cfg.unet.steps / max(t_unet, 1e-9), "losses": unet_losses},
        "params": {n: sum(p.numel() for p in m.parameters()) for n, m in (("vae", vae), ("text_encoder", text), ("unet", unet))},
    }
    # 4. Save everything at once (one writer: every rank holds the same weights).
    if not distributed.is_main():
        return record
    with atomic_path(cfg.out) as tmp:
        save_pipeline(tmp, vae, text, tokenizer, unet)
        (tmp / "training_config.json").write_text(json.dumps(config_to_dict(cfg), indent=1, sort_keys=True))
        (tmp / "training_log.json").write_text(json.dumps(record))
    return record


def _train_and_evaluate(args: argparse.Namespace) -> str:
    from brainldm.train.ldm.held_out import evaluate, folder_megabytes

    cfg = load_config(TrainLdmConfig, "train_ldm", args.params)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if not args.skip_train:
        record = run(cfg)
        print(f"trained on {record['device']}: vae {record['vae']['seconds']:.0f} s, unet {record['unet']['seconds']:.0f} s")
    if not distributed.is_main():  # rank 0 evaluates what it saved
        return ""
    metrics = evaluate(cfg)
    metrics["size_mb"] = folder_megabytes(cfg.out)
    write_text_atomic(cfg.metrics, json.dumps(metrics, indent=1, sort_keys=True))
    write_text_atomic(Path(cfg.out) / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
    return json.dumps(metrics, indent=1, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="overrides train_ldm.device")
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the existing folder")
    args = parser.parse_args(argv)
    with distributed.quiet_unless_main():  # under torchrun one summary, rank 0's
        return run_stage(lambda: _train_and_evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
