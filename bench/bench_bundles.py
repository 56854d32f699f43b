"""The models and bundles that ``bench_runtime.py`` measures (built here, nothing downloaded).

SD v1.4's UNet and VAE from their published configs with random weights (the GPU
benchmark, 512 px), the default small LDM's architecture from params.yaml with random
weights, and the test suite's tiny model (the CPU fallback); each exported to a bundle
with linear decoders over a one-session prepared file, as the pipeline's export does.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.tiny_models / tests.export.tiny_bundle (the tiny CPU fixture)
GPU_BATCHES = (1, 4, 16)
GPU_RESOLUTION = 512
SD14_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD14_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "act_fn": "silu", "norm_num_groups": 32, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
SD14_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                  "set_alpha_to_one": False, "steps_offset": 1}
SD_TEXT_SHAPE = (77, 768)
GPU_N_VOXELS = 256


def tiny_bundle(root: Path, steps: int) -> Path:
    """The test suite's tiny model and decoders exported to a bundle (CPU benchmark fallback)."""
    import dataclasses

    from brainldm.export import export
    from tests.export.tiny_bundle import DATASET, PAIR, make_configs

    ecfg, rc = make_configs(root)
    return export.run(ecfg, dataclasses.replace(rc, steps=steps), DATASET, PAIR)


def save_random_model(folder: Path, vae, unet) -> Path:
    """Save (vae, unet) as a diffusers SD v1 folder with SD v1.4's scheduler and a small random text
    encoder of the UNet's cross-attention width: it is never run (c comes from the decoders), it only
    completes the layout that load_image_model reads."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import _tiny_tokenizer

    width = int(unet.config.cross_attention_dim)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=SD_TEXT_SHAPE[0]))
    StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text, tokenizer=_tiny_tokenizer(CLIPTokenizer), unet=unet,
        scheduler=DDIMScheduler(**SD14_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def random_bundle(root: Path, name: str, vae, unet, steps: int, **export_overrides) -> Path:
    """Save (vae, unet) with random weights as a diffusers folder, add linear decoders, a one-session
    prepared file and targets, and export the pair (name, name) of dataset "bench"."""
    import h5py
    import numpy as np
    import torch

    from brainldm.export import export
    from brainldm.export.export import ExportConfig
    from brainldm.train.decoding import decoders
    from brainldm.train.reconstruction.reconstruct import PairConfig, ReconstructConfig

    width = int(unet.config.cross_attention_dim)
    save_random_model(root / name, vae, unet)
    side = int(unet.config.sample_size)
    for key, shape in {"z": (4, side, side), "c": (SD_TEXT_SHAPE[0], width)}.items():
        spec = decoders.DecoderSpec("ridge", key, shape, ("A",), (GPU_N_VOXELS,), {})
        decoders.save_checkpoint(root / "decoders" / "bench" / f"{name}-{key}.safetensors", spec,
                                 decoders.build_decoder(spec), torch.zeros(spec.out_dim),
                                 torch.full((spec.out_dim,), 0.1), "{}")
    (root / "prepared").mkdir()
    with h5py.File(root / "prepared" / "bench.h5", "w") as f:
        f.attrs.update(dataset="bench", subject="random", source="none")
        f["rois/A/columns"] = np.arange(GPU_N_VOXELS)
        f["norm/sessions"], f["norm/voxel_ids"] = np.array([1]), np.arange(GPU_N_VOXELS)
        f["norm/mean"], f["norm/std"] = np.zeros((1, GPU_N_VOXELS), np.float32), np.ones((1, GPU_N_VOXELS), np.float32)
    (root / "targets").mkdir()
    with h5py.File(root / "targets" / "bench.h5", "w") as f:
        f["uncond"] = np.random.default_rng(0).standard_normal((SD_TEXT_SHAPE[0], width)).astype(np.float32)
    ecfg = ExportConfig(prepared_dir=str(root / "prepared"), targets_dir=str(root / "targets"),
                        models_dir=str(root / "decoders"), out_dir=str(root / "bundles"),
                        checks_dir=str(root / "checks"), check_batch=1,
                        **export_overrides)
    rc = ReconstructConfig(model=str(root / name), pairs={name: PairConfig(z=f"{name}-z", c=f"{name}-c")},
                           samples=1, steps=steps, seed=0)
    return export.run(ecfg, rc, "bench", name)


def build_sd14_bundle(root: Path, steps: int) -> Path:
    """SD v1.4 architecture (random weights) at 512 px, exported with fp16 graphs and TensorRT engines."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    # random weights give larger activations than trained ones: the graph checks use loose bounds here
    return random_bundle(root, "sd14", AutoencoderKL(**SD14_VAE), UNet2DConditionModel(**SD14_UNET), steps,
                         fp16=True, trt_batch_sizes=GPU_BATCHES, unet_atol=1e-2, vae_atol=1e-2, fp16_atol=1.0)


def build_small_ldm_bundle(root: Path, steps: int, params: Path = Path("params.yaml")) -> Path:
    """The default small LDM's architecture (params' ``train_ldm`` section) with random weights."""
    import torch

    from brainldm.train.config import load_config
    from brainldm.train.ldm.train_ldm import TrainLdmConfig, build_models

    torch.manual_seed(0)
    vae, _, unet = build_models(load_config(TrainLdmConfig, "train_ldm", params), vocab_size=1000, bos=0, eos=1)
    return random_bundle(root, "small-ldm", vae, unet, steps, tensorrt=False)


def flops_per_image(steps: int, strength: float) -> dict:
    """FLOPs of one reconstruction at 512 px (meta tensors: counted, not computed)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD14_UNET), AutoencoderKL(**SD14_VAE)
        latent = torch.empty(1, 4, GPU_RESOLUTION // 8, GPU_RESOLUTION // 8)
        counts = {}
        for name, call in (("unet", lambda: unet(latent, torch.tensor([1]), torch.empty(1, *SD_TEXT_SHAPE))),
                           ("vae_decoder", lambda: vae.decode(latent)),
                           ("vae_encoder", lambda: vae.encode(torch.empty(1, 3, GPU_RESOLUTION, GPU_RESOLUTION)))):
            with FlopCounterMode(display=False) as counter:
                call()
            counts[name] = counter.get_total_flops()
    unet_calls = 2 * min(int(steps * strength), steps)  # CFG doubles every denoising step
    counts["per_image"] = unet_calls * counts["unet"] + 2 * counts["vae_decoder"] + counts["vae_encoder"]
    return counts
