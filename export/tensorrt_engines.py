"""Optional TensorRT fp16 engines for a bundle's ONNX graphs.

Engines are specific to the TensorRT version and the GPU, so they live in
``tensorrt/<trt version>_<gpu name>/<model>.plan`` (bundle_format.engine_file) and the
manifest records both; the
runtime's ``tensorrt`` backend refuses engines built for another version or GPU
(and the ONNX graphs stay the portable source of truth). Each engine has one
optimisation profile whose batch range covers ``batch_sizes`` (min, opt = the middle
size, max); the UNet's batch is doubled because classifier-free guidance runs
[uncond; cond] in one call.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from brainldm.runtime import bundle_format as bf

WORKSPACE_BYTES = 4 * 1024 ** 3
DOUBLED_BATCH_MODELS = ("unet",)
PRECISION = "fp16"


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def gpu_name() -> str:
    """The CUDA device 0's name (via torch), or "unknown-gpu"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown-gpu"


def engine_folder_name(trt_version: str, gpu: str) -> str:
    """Folder-safe ``<trt version>_<gpu name>``."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", f"{trt_version}_{gpu}").strip("-")


def build_all(bundle: Path, models: dict[str, bf.ModelEntry], batch_sizes: tuple[int, ...],
              latent_sides: tuple[int, ...]) -> bf.TensorRTEngines | None:
    """Build one fp16 engine per ONNX graph of ``models`` (name -> manifest entry) under ``bundle``.

    ``latent_sides``: the latent sizes the VAE decoder's dynamic spatial axes must cover
    (predicted z and generation size; its image axes are those times the scale factor).

    Returns the manifest's ``tensorrt`` entry (engines: name -> file, profiles: name -> [min, opt,
    max] batch) or None, with a message, when tensorrt is missing.
    """
    if not tensorrt_available():
        print("export: tensorrt is not importable; skipping TensorRT engines (the ONNX graphs are in the bundle; "
              "install the gpu extra on a CUDA machine to build them)", file=sys.stderr)
        return None
    import tensorrt as trt

    gpu = gpu_name()
    folder = f"{bf.TENSORRT_DIR}/{engine_folder_name(trt.__version__, gpu)}"
    (bundle / folder).mkdir(parents=True)
    sizes = sorted(set(int(b) for b in batch_sizes))
    engines, profiles = {}, {}
    for name, model in models.items():
        factor = 2 if name in DOUBLED_BATCH_MODELS else 1
        profiles[name] = (sizes[0] * factor, sizes[len(sizes) // 2] * factor, sizes[-1] * factor)
        engines[name] = bf.engine_file(folder, name)
        _build_engine(trt, bundle / model.file, bundle / engines[name], model.inputs, profiles[name],
                      (min(latent_sides), max(latent_sides)))
    return bf.TensorRTEngines(folder=folder, trt_version=trt.__version__, gpu=gpu, precision=PRECISION,
                              engines=engines, profiles=profiles)


def _build_engine(trt, onnx_path: Path, plan_path: Path, inputs: tuple[bf.TensorInfo, ...],
                  profile: tuple[int, int, int], side_range: tuple[int, int]) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for spec in inputs:
        # symbolic non-batch axes are the VAE decoder's latent height/width: min, opt = max, max
        low = [side_range[0] if isinstance(d, str) else int(d) for d in spec.shape[1:]]
        high = [side_range[1] if isinstance(d, str) else int(d) for d in spec.shape[1:]]
        opt.set_shape(spec.name, (profile[0], *low), (profile[1], *high), (profile[2], *high))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(serialized))
