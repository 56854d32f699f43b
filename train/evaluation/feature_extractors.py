"""MindEye's network feature spaces, with weights read only from local paths (never downloaded).

Registry: ``FEATURE_EXTRACTORS[name]`` is ``loader(weights_path, batch_size=...) -> features_fn`` for each
MindEye space in ``MINDEYE_SPACES``; ``features_fn`` maps images (N, H, W, 3) uint8 to
features (N, F) float32. train/evaluation/evaluate.py calls the loader for every space whose
``evaluate.feature_weights.<name>`` is set and reports the others as not computed.

Reproduces MindEye's evaluation (MindEye1 ``src/Reconstruction_Metrics.py``, MindEye2
``src/final_evaluations.ipynb``), which runs torchvision feature extractors on 256 px
images in [0, 1]:

* images go to the 256 px reference size as float in [0, 1] with the same resize as PixCorr
  and SSIM (``metrics.prepare_images``; docs/data-formats.md, "Evaluation definitions":
  the ground truth at 256 px, the reconstruction resized to 256 px first);
* then torchvision's tensor ``Resize(S)``: bilinear, ``align_corners=False`` and no
  antialiasing (MindEye ran torchvision < 0.17, whose tensor default was no antialias), to
  S = torchvision's ``weights.transforms()`` resize size (AlexNet 256, Inception 342,
  EfficientNet-B1 255) or 224 (CLIP, SwAV); MindEye does NOT centre-crop;
* then mean/std normalisation (ImageNet, or CLIP's for CLIP).

Features: AlexNet ``features.4`` / ``features.11`` flattened (192x31x31 / 256x15x15 at
256 px), Inception v3 avgpool (2048), CLIP ViT-L/14 projected image embedding
(``encode_image``; 768), EfficientNet-B1 avgpool (1280), SwAV ResNet-50 avgpool (2048). The
torchvision networks are re-implemented in train/feature_nets*.py (torchvision cannot be
installed here); CLIP uses transformers. Everything runs on CPU in float32, eval mode, no
grad (MindEye ran CLIP in float16 on GPU; float32 differs from it only by rounding).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainldm.train.evaluation import metrics
from brainldm.train.evaluation.feature_nets import IMAGENET_MEAN, IMAGENET_STD, AlexNet, EfficientNetB1, ResNet50

# MindEye feature spaces: name -> (what is reported, description). Identification is
# higher-is-better (chance 0.5); distance is the mean correlation distance, lower is better.
MINDEYE_SPACES = {
    "alexnet2": ("identification", "AlexNet features.4"),
    "alexnet5": ("identification", "AlexNet features.11"),
    "inceptionv3": ("identification", "InceptionV3 avgpool"),
    "clip_vitl14": ("identification", "CLIP ViT-L/14 image embedding"),
    "effnet_b1": ("distance", "EfficientNet-B1 avgpool"),
    "swav": ("distance", "SwAV ResNet-50 avgpool"),
}

FeatureFn = Callable[[np.ndarray], np.ndarray]  # images (N, H, W, 3) uint8 -> (N, F) float32
FEATURE_EXTRACTORS: dict[str, Callable[[str], FeatureFn]] = {}


def register_extractor(name: str):
    """Register ``loader(weights_path, batch_size=...) -> features_fn`` for MindEye space ``name``."""
    def wrap(loader: Callable[[str], FeatureFn]) -> Callable[[str], FeatureFn]:
        FEATURE_EXTRACTORS[name] = loader
        return loader
    return wrap


# ---- preprocessing ---------------------------------------------------------------------

# openai/CLIP's image normalisation (clip.load's preprocess; MindEye copies it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# MindEye's Resize(S) per network (no crop). AlexNet, Inception and EfficientNet-B1 take the
# resize size of torchvision's weights.transforms() (AlexNet_Weights.IMAGENET1K_V1,
# Inception_V3_Weights.IMAGENET1K_V1, EfficientNet_B1_Weights.IMAGENET1K_V2); CLIP and SwAV 224.
ALEXNET_SIZE = 256
INCEPTION_SIZE = 342
CLIP_SIZE = 224  # = ViT-L/14's input size; the CLIP loader uses the checkpoint's config.image_size
EFFNET_SIZE = 255
SWAV_SIZE = 224
ALEXNET_LAYERS = {"alexnet2": 4, "alexnet5": 11}  # torchvision features.<i>: ReLU after conv2 / conv5
DEFAULT_BATCH_SIZE = 32  # = EvaluateConfig.batch_size's default


@dataclass(frozen=True)
class Preprocess:
    """MindEye's per-network input: bilinear resize to ``size`` x ``size``, then (x - mean) / std."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


PREPROCESS = {
    "alexnet2": Preprocess(ALEXNET_SIZE), "alexnet5": Preprocess(ALEXNET_SIZE),
    "inceptionv3": Preprocess(INCEPTION_SIZE), "clip_vitl14": Preprocess(CLIP_SIZE, CLIP_MEAN, CLIP_STD),
    "effnet_b1": Preprocess(EFFNET_SIZE), "swav": Preprocess(SWAV_SIZE),
}


def preprocess(images: np.ndarray, spec: Preprocess) -> torch.Tensor:
    """Images (N, H, W, 3) uint8 (square) -> network input (N, 3, size, size) float32, normalised.

    256 px float [0, 1] as for PixCorr/SSIM, then torchvision tensor ``Resize(size)`` semantics
    (bilinear, no antialias; the identity at 256 -> 256), then mean/std per channel.
    """
    unit = metrics.prepare_images(images, metrics.REFERENCE_SIZE)
    x = torch.from_numpy(np.ascontiguousarray(unit.transpose(0, 3, 1, 2)))
    x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def feature_fn(forward: Callable[[torch.Tensor], torch.Tensor], spec: Preprocess, batch_size: int) -> FeatureFn:
    """Wrap ``forward`` (network input -> features) as images (N, H, W, 3) uint8 -> (N, F) float32, batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}; expected >= 1")

    def features(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                out.append(forward(preprocess(images[start:start + batch_size], spec)).flatten(1).float().numpy())
        if not out:
            raise ValueError("no images given; expected images (N, H, W, 3) with N >= 1")
        return np.concatenate(out).astype(np.float32, copy=False)
    return features


# ---- weights ---------------------------------------------------------------------------

DATA_PARALLEL_PREFIX = "module."  # nn.DataParallel / DistributedDataParallel checkpoints (SwAV)
BN_COUNTER_SUFFIX = "num_batches_tracked"  # BatchNorm's step counter: unused at eval, absent from old files
MAX_LISTED = 10  # keys named in an error message


class FeatureWeightsError(ValueError):
    """A feature network's weights file does not have the expected format or keys."""


@dataclass(frozen=True)
class WeightsFormat:
    """What a weights file must hold, for error messages and key matching."""

    network: str  # e.g. "torchvision alexnet"
    source: str  # the expected file and where to get it
    dropped: tuple[str, ...] = ()  # file key prefixes of other heads, ignored (SwAV's projection head)
    optional: tuple[str, ...] = ()  # network key prefixes a file may lack; not used by the features


def read_state_dict(path: str | Path, fmt: WeightsFormat) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pth/.pth.tar file (``torch.load(weights_only=True)``).

    A checkpoint wrapping its weights under ``"state_dict"`` is unwrapped. Raises
    FileNotFoundError or FeatureWeightsError naming ``path`` and the expected file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fmt.network} weights not found: {path}; expected {fmt.source}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many types for a corrupt or foreign file
        raise FeatureWeightsError(f"{path}: cannot be read as {fmt.network} weights ({exc!r}); "
                                  f"expected {fmt.source}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise FeatureWeightsError(f"{path}: holds {type(state).__name__}, not a state dict (parameter name -> "
                                  f"tensor); expected {fmt.source}")
    return dict(state)


def _listed(keys: list[str]) -> str:
    return f"{keys[:MAX_LISTED]}{' ...' if len(keys) > MAX_LISTED else ''} ({len(keys)})"


def load_weights(model: nn.Module, path: str | Path, fmt: WeightsFormat) -> nn.Module:
    """Load ``path`` into ``model`` with strict key and shape matching; returns it in eval mode.

    ``module.`` prefixes are stripped and ``fmt.dropped`` keys ignored; every other network
    key must be in the file unless it starts with an ``fmt.optional`` prefix or is a
    BatchNorm counter, and every file key must be a network key of the same shape.
    """
    state = {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in read_state_dict(path, fmt).items()}
    state = {k: v for k, v in state.items() if not k.startswith(fmt.dropped)}  # startswith(()) is False
    expected = model.state_dict()
    missing = sorted(k for k in expected.keys() - state.keys()
                     if not k.startswith(fmt.optional) and not k.endswith(BN_COUNTER_SUFFIX))
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                    for k in state.keys() & expected.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        problems = [f"{what} {_listed(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
        raise FeatureWeightsError(f"{path}: not {fmt.network} weights: {'; '.join(problems)}; expected {fmt.source}")
    model.load_state_dict(state, strict=False)  # strictness checked above, with the optional keys allowed
    return model.float().eval()


TORCHVISION_URL = "https://download.pytorch.org/models/"
ALEXNET_WEIGHTS = WeightsFormat(
    "torchvision alexnet", "torchvision's AlexNet_Weights.IMAGENET1K_V1 file alexnet-owt-7be5be79.pth "
    f"({TORCHVISION_URL}alexnet-owt-7be5be79.pth), or a .safetensors file with the same keys")
INCEPTION_WEIGHTS = WeightsFormat(
    "torchvision inception_v3", "torchvision's Inception_V3_Weights.IMAGENET1K_V1 file inception_v3_google-0cc3c7bd.pth "
    f"({TORCHVISION_URL}inception_v3_google-0cc3c7bd.pth), or a .safetensors file with the same keys "
    "(AuxLogits.* may be left out)", optional=("AuxLogits.",))
EFFNET_WEIGHTS = WeightsFormat(
    "torchvision efficientnet_b1", "torchvision's EfficientNet_B1_Weights.IMAGENET1K_V2 file (MindEye's DEFAULT) "
    f"efficientnet_b1-c27df63c.pth ({TORCHVISION_URL}efficientnet_b1-c27df63c.pth), or a .safetensors file "
    "with the same keys")
SWAV_WEIGHTS = WeightsFormat(
    "SwAV ResNet-50", "facebookresearch/swav's swav_800ep_pretrain.pth.tar "
    "(https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar; the torch.hub "
    "'facebookresearch/swav:main' resnet50 MindEye loads), or a state dict with torchvision resnet50 keys",
    dropped=("projection_head.", "prototypes."), optional=("fc.",))


# ---- loaders ---------------------------------------------------------------------------

def _alexnet(path: str, name: str, batch_size: int) -> FeatureFn:
    model = load_weights(AlexNet(), path, ALEXNET_WEIGHTS)
    return feature_fn(lambda x: model.feature_map(x, ALEXNET_LAYERS[name]), PREPROCESS[name], batch_size)


@register_extractor("alexnet2")
def load_alexnet2(path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureFn:
    """AlexNet ``features.4`` (ReLU after conv2), flattened: (N, 192 * 31 * 31)."""
    return _alexnet(path, "alexnet2", batch_size)


@register_extractor("alexnet5")
def load_alexnet5(path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureFn:
    """AlexNet ``features.11`` (ReLU after conv5), flattened: (N, 256 * 15 * 15)."""
    return _alexnet(path, "alexnet5", batch_size)


@register_extractor("inceptionv3")
def load_inceptionv3(path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureFn:
    """Inception v3 avgpool (transform_input as with torchvision's pretrained weights): (N, 2048)."""
    from brainldm.train.evaluation.feature_nets_inception import Inception3

    model = load_weights(Inception3(transform_input=True), path, INCEPTION_WEIGHTS)
    return feature_fn(model.pooled_features, PREPROCESS["inceptionv3"], batch_size)


@register_extractor("effnet_b1")
def load_effnet_b1(path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureFn:
    """EfficientNet-B1 avgpool: (N, 1280)."""
    model = load_weights(EfficientNetB1(), path, EFFNET_WEIGHTS)
    return feature_fn(model.pooled_features, PREPROCESS["effnet_b1"], batch_size)


@register_extractor("swav")
def load_swav(path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureFn:
    """SwAV-pretrained ResNet-50 avgpool: (N, 2048). The fc head (absent from SwAV's file) is unused."""
    model = load_weights(ResNet50(), path, SWAV_WEIGHTS)
    return feature_fn(model.pooled_features, PREPROCESS["swav"], batch_size)


CLIP_SOURCE = ("a local folder of the Hugging Face model openai/clip-vit-large-patch14 (config.json and "
               "model.safetensors or pytorch_model.bin, e.g. `huggingface-cli download openai/clip-vit-large-patch14 "
               "--local-dir <folder>`)")


@register_extractor("clip_vitl14")
def load_clip_vitl14(path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureFn:
    """CLIP projected image embedding (openai ``encode_image`` = transformers ``image_embeds``): (N, 768).

    Reads the folder with ``local_files_only=True``; the input size is the checkpoint's
    ``vision_config.image_size`` (224 for ViT-L/14).
    """
    from transformers import CLIPVisionModelWithProjection

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP ViT-L/14 weights not found: {folder} has no config.json; expected {CLIP_SOURCE}")
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True,
                                                                    output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureWeightsError(f"{folder}: cannot be loaded as a CLIP vision model ({exc!r}); "
                                  f"expected {CLIP_SOURCE}") from exc
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise FeatureWeightsError(f"{folder}: not CLIP vision weights: missing keys {_listed(sorted(info['missing_keys']))}"
                                  f", mismatched {_listed(sorted(map(str, info.get('mismatched_keys', []))))}; "
                                  f"expected {CLIP_SOURCE}")
    model = model.float().eval()
    spec = Preprocess(model.config.image_size, CLIP_MEAN, CLIP_STD)
    return feature_fn(lambda x: model(pixel_values=x).image_embeds, spec, batch_size)
