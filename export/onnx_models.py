"""ONNX export of the decoders, the UNet and the VAE halves, each checked against torch.

Every graph is exported with the TorchScript exporter (``torch.onnx.export(...,
dynamo=False)``), opset >= 17, a dynamic batch axis named ``batch`` and fixed spatial
sizes (the generation resolution is fixed per bundle). Models whose weights exceed
protobuf's 2 GB limit are written with external data (``<name>.onnx.data`` next to
the graph, which the exporter does on its own above that size; we then re-save with
one data file so the bundle's file list is predictable).

Graph contracts (what the runtime feeds and reads):

- decoder ``x (B, V) float32`` z-scored voxels -> ``pred (B, *target_shape) float32``
  in target units (z: (B, 4, h, w) latents x scaling; c: (B, T, D) text states).
- unet ``sample (B, 4, h, w)``, ``timestep (B,) float32``, ``encoder_hidden_states
  (B, T, D)`` -> ``noise_pred (B, 4, h, w)``. The timestep is float32 because the UNet's
  sinusoidal projection casts it to float first (exact for integers < 2^24).
- vae_decoder ``latents (B, 4, h, w)`` *unscaled* (z / scaling_factor, the division is
  done by the runtime in float32, exactly as diffusers does before ``vae.decode``) ->
  ``image (B, 3, R, R)`` in about [-1, 1], not clamped.
- vae_encoder ``image (B, 3, R, R)`` in [-1, 1] -> ``mean, std (B, 4, h, w)`` of the
  diagonal Gaussian posterior (std = exp(logvar / 2), logvar clamped to [-30, 20] by
  diffusers), *unscaled*: the runtime forms (mean + std * noise) * scaling_factor.

Keeping the scaling factor out of the VAE graphs makes the runtime's arithmetic the
reference's, operation for operation. fp16 variants (``export_fp16``) are traced from
``module.half()`` and take/return float16; the runtime's backends cast at the boundary.
"""
from __future__ import annotations

import copy
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from brainldm.runtime.bundle_format import TensorInfo

BATCH_AXIS = "batch"
PROTOBUF_LIMIT_BYTES = 2 * 1024 ** 3
MIN_OPSET = 17


class ExportParityError(RuntimeError):
    """An exported ONNX graph disagrees with its torch module beyond the tolerance."""


@dataclass(frozen=True)
class GraphSpec:
    """What one exported graph is: names, inputs for tracing and checking, tolerance.

    ``spatial``: 4-D inputs/outputs also get dynamic height/width axes (``<tensor>_height``,
    ``<tensor>_width``); ``extra_checks``: further inputs (e.g. another size) checked after export.
    """

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    output_names: tuple[str, ...]
    atol: float
    spatial: bool = False
    extra_checks: tuple[dict[str, torch.Tensor], ...] = ()


class UnetGraph(nn.Module):
    """``(sample, timestep, encoder_hidden_states) -> noise_pred``: the UNet without its dict output."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    """``latents (B, 4, h, w)`` unscaled -> ``image (B, 3, R, R)``: ``vae.decode(latents).sample``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """``image (B, 3, R, R)`` -> posterior ``(mean, std)``, each ``(B, 4, h, w)`` unscaled."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.std


def decoder_graph(name: str, predictor: nn.Module, n_voxels: int, atol: float, batch: int, seed: int) -> GraphSpec:
    """GraphSpec of a decoder predictor ``x (B, V) -> (B, *target_shape)`` with seeded z-score-like inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_voxels, generator=gen)
    return GraphSpec(name, predictor.eval(), {"x": x}, ("pred",), atol)


def image_model_graphs(pipe, resolution: int, text_shape: tuple[int, int], atols: dict[str, float],
                       batch: int, seed: int, z_side: int | None = None) -> list[GraphSpec]:
    """GraphSpecs of unet, vae_decoder and vae_encoder at ``resolution`` px with seeded inputs.

    ``text_shape`` = (T, D) of the text states; ``atols`` maps "unet"/"vae" to tolerances.
    The VAE decoder has dynamic spatial axes: it decodes the predicted z (``z_side`` latent
    cells, the targets' size) as well as the generated latents (``resolution`` / factor);
    both sizes are checked.
    """
    gen = torch.Generator().manual_seed(seed)
    factor = int(pipe.vae_scale_factor)
    channels = int(pipe.vae.config.latent_channels)
    latent = (batch, channels, resolution // factor, resolution // factor)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    unet_inputs = {
        "sample": torch.randn(latent, generator=gen),
        "timestep": torch.randint(0, n_train, (batch,), generator=gen).float(),
        "encoder_hidden_states": torch.randn((batch,) + tuple(text_shape), generator=gen),
    }
    image = torch.rand((batch, 3, resolution, resolution), generator=gen) * 2 - 1
    z_side = z_side or latent[-1]
    z_check = () if z_side == latent[-1] else ({"latents": torch.randn(latent[:2] + (z_side, z_side), generator=gen)},)
    return [
        GraphSpec("unet", UnetGraph(pipe.unet).eval(), unet_inputs, ("noise_pred",), atols["unet"]),
        GraphSpec("vae_decoder", VaeDecoderGraph(pipe.vae).eval(), {"latents": torch.randn(latent, generator=gen)},
                  ("image",), atols["vae"], spatial=True, extra_checks=z_check),
        GraphSpec("vae_encoder", VaeEncoderGraph(pipe.vae).eval(), {"image": image}, ("mean", "std"), atols["vae"]),
    ]


def export_graph(spec: GraphSpec, path: Path, opset: int) -> None:
    """Export ``spec.module`` to ``path`` (ONNX, dynamic batch axis), external data above 2 GB."""
    if opset < MIN_OPSET:
        raise ValueError(f"export: opset {opset} is too old; expected >= {MIN_OPSET} (18 recommended)")
    dynamic_axes = {name: {0: BATCH_AXIS} for name in (*spec.inputs, *spec.output_names)}
    if spec.spatial:
        for name in dynamic_axes:
            dynamic_axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
    work = path.parent / f".{path.stem}-export"
    work.mkdir(parents=True)
    try:
        raw = work / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
            torch.onnx.export(
                spec.module, tuple(spec.inputs.values()), str(raw), dynamo=False, opset_version=opset,
                input_names=list(spec.inputs), output_names=list(spec.output_names), dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        _gather(raw, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gather(raw: Path, path: Path) -> None:
    """Move the graph to ``path``; above 2 GB the exporter scatters one file per tensor, which
    we gather into a single ``<name>.onnx.data`` so that the bundle's file list is predictable."""
    if len(list(raw.parent.iterdir())) == 1 and raw.stat().st_size < PROTOBUF_LIMIT_BYTES:
        os.replace(raw, path)
        return
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def onnx_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session (deterministic: fixed thread count)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed_dtypes(session: ort.InferenceSession) -> dict[str, type]:
    return {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}


def check_graph(spec: GraphSpec, path: Path, atol: float | None = None) -> dict[str, float]:
    """Max abs difference ONNX (ORT CPU) vs ``spec.module`` per output; raises ExportParityError above the tolerance.

    ``atol`` defaults to ``spec.atol``. Inputs are cast to the graph's input dtype (an fp16
    graph is compared against the fp32 torch module). Runs the check batch and batch 1, so
    that the dynamic batch axis is exercised.
    """
    atol = spec.atol if atol is None else atol
    session = onnx_session(path)
    dtypes = _feed_dtypes(session)
    errors = {}
    batches = sorted({1, next(iter(spec.inputs.values())).shape[0]})
    for batch, full in [(b, i) for i in (spec.inputs, *spec.extra_checks) for b in batches]:
        inputs = {k: v[:batch] for k, v in full.items()}
        with torch.no_grad():
            expected = spec.module(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(list(spec.output_names), {k: v.numpy().astype(dtypes[k]) for k, v in inputs.items()})
        for name, e, g in zip(spec.output_names, expected, got):
            if g.shape != tuple(e.shape):
                raise ExportParityError(f"{path.name}: output {name} has shape {g.shape}, torch gives {tuple(e.shape)}")
            errors[name] = max(errors.get(name, 0.0), float(np.abs(g.astype(np.float32) - e.numpy()).max()))
    worst = max(errors.values())
    if not np.isfinite(worst) or worst > atol:
        raise ExportParityError(f"{path.name}: ONNX vs torch max abs difference {errors} exceeds the tolerance "
                                f"{atol} (onnxruntime CPU vs fp32 torch); nothing was written")
    return errors


def io_names(path: Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """(inputs, outputs) of an ONNX graph: names, dtypes and shapes (symbolic axes as strings, unknown None)."""
    session = onnx_session(path)

    def describe(args) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(name=a.name, type=a.type,
                                shape=tuple(d if isinstance(d, (int, str)) else None for d in a.shape)) for a in args)

    return describe(session.get_inputs()), describe(session.get_outputs())


def graph_files(path: Path) -> list[Path]:
    """The graph file plus its external data file, if any."""
    data = path.with_name(f"{path.name}.data")
    return [path, data] if data.is_file() else [path]


def export_fp16(spec: GraphSpec, path: Path, opset: int) -> None:
    """Export an fp16 copy of ``spec.module`` (weights, inputs and outputs float16) to ``path``.

    Traced from ``module.half()`` rather than converted graph-side, so every cast the model
    does internally (e.g. the timestep projection) follows the module's dtype.
    """
    half = GraphSpec(spec.name, copy.deepcopy(spec.module).half(),
                     {k: v.half() if v.is_floating_point() else v for k, v in spec.inputs.items()},
                     spec.output_names, spec.atol)
    export_graph(half, path, opset)
