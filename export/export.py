"""Stage `export`: one (dataset, decoder pair) -> a self-contained runtime bundle.

The bundle (``<out_dir>/<dataset>-<pair>/``, written atomically as one folder) holds
ONNX graphs of the pair's z- and c-decoders, the UNet and both VAE halves, every
array the runtime needs (normalisation statistics, decoder input columns, the
empty-prompt text states, diffusers' alphas_cumprod) and ``manifest.json`` with the
generation settings and the sha256 of every file. Generation settings (steps,
strength, guidance, samples, seed, encode_mode, resolution, image model, pairs) are
read from the params section ``reconstruct``, so the bundle reproduces exactly the
reference reconstruction; section ``export`` holds what is specific to exporting.

The layout, the model and array names and the typed manifest are the bundle contract
(``runtime/bundle_format.py``), which the runtime validates bundles against on load.

Each graph is checked against torch on fixed inputs before anything is written; the
measured differences go to ``<checks_dir>/<dataset>-<pair>.json``, not into the bundle:
they depend on the processor ONNX Runtime runs on, and the bundle must not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from brainldm.export import onnx_models, tensorrt_engines
from brainldm.runtime import bundle_format as bf
from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.train.decoding import decoders
from brainldm.train.config import ConfigError, config_to_record, load_config, run_stage
from brainldm.train.reconstruction.reconstruct import (PairConfig, ReconstructConfig, check_encode_mode,
                                                       load_reference_pipeline, native_resolution)

GRAPH_DTYPE = "float32"  # of every graph's main file (the fp16 variants are listed apart)
INPUT_LAYOUT = "betas (n, n_voxels) float32 raw responses, columns in voxel_ids order; one session per row"
NORMALISATION_FORMULA = "(betas - mean[session]) / std[session], float32; then repeats averaged in float64"


@dataclass(frozen=True)
class ExportConfig:
    """Params section `export` (generation settings come from section `reconstruct`)."""

    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"
    models_dir: str = "models/decoders"
    out_dir: str = "bundles"
    checks_dir: str = "results/export"  # ONNX Runtime vs torch differences of each graph (a metrics file)
    opset: int = 18
    fp16: bool = False  # also write *.fp16.onnx of the UNet and VAE (fp16 IO)
    tensorrt: bool = False  # build fp16 engines when the tensorrt module is importable
    trt_batch_sizes: tuple[int, ...] = (1, 4, 16)  # images per call; the UNet profile doubles them (CFG)
    check_batch: int = 2  # batch of the fixed random inputs each graph is checked on
    check_seed: int = 0
    decoder_atol: float = 1.0e-4
    unet_atol: float = 1.0e-4
    vae_atol: float = 3.0e-4
    fp16_atol: float = 0.1  # sanity bound of fp16 graphs vs fp32 torch (fp16 quality is judged by PSNR)


class ExportError(ValueError):
    """The inputs of the export do not fit together."""


def read_prepared(path: Path) -> dict:
    """Input layout, normalisation, ROI columns and graph of a prepared file (no split data)."""
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {path} (run the prepare stage first)")
    with h5py.File(path, "r") as f:
        info = {k: str(f.attrs.get(k, "")) for k in ("dataset", "subject", "source")}
        info["voxel_ids"] = np.asarray(f["norm/voxel_ids"], np.int64)
        info["sessions"] = np.asarray(f["norm/sessions"], np.int64)
        info["mean"] = np.asarray(f["norm/mean"], np.float32)
        info["std"] = np.asarray(f["norm/std"], np.float32)
        info["columns"] = {roi: np.asarray(f[f"rois/{roi}/columns"], np.int64) for roi in f["rois"]}
        info["graph"] = None
        if "graph" in f:
            g = f["graph"]
            info["graph"] = bf.RoiGraph(edge_index=tuple(map(tuple, np.asarray(g["edge_index"]).tolist())),
                                        edge_weight=tuple(np.asarray(g["edge_weight"], np.float64).tolist()),
                                        node_rois=tuple(map(tuple, json.loads(g["node_rois"][()]))),
                                        pad_length=int(g.attrs["pad_length"]))
    return info


def decoder_columns(checkpoint: decoders.Checkpoint, columns: dict[str, np.ndarray], where: str) -> np.ndarray:
    """Columns into the betas layout of the decoder's input voxels: its ROIs' columns in input_rois order."""
    spec = checkpoint.spec
    missing = [r for r in spec.input_rois if r not in columns]
    if missing:
        raise ExportError(f"{where}: decoder input ROI(s) {missing} are not in the prepared file; "
                          f"available: {sorted(columns)}")
    sizes = [len(columns[r]) for r in spec.input_rois]
    if tuple(sizes) != tuple(spec.roi_sizes):
        raise ExportError(f"{where}: ROI voxel counts {dict(zip(spec.input_rois, sizes))} differ from the fitted "
                          f"decoder's {dict(zip(spec.input_rois, spec.roi_sizes))}")
    return np.concatenate([columns[r] for r in spec.input_rois]).astype(np.int64)


def load_pair(cfg: ExportConfig, dataset: str, pair: PairConfig) -> dict[str, decoders.Checkpoint]:
    """The pair's checkpoints, keyed "z" and "c", with their targets checked."""
    out = {}
    for key, name in (("z", pair.z), ("c", pair.c)):
        checkpoint = decoders.load_checkpoint(Path(cfg.models_dir) / dataset / f"{name}.safetensors")
        if checkpoint.spec.target != key:
            raise ExportError(f"decoder '{name}' predicts {checkpoint.spec.target!r} but is the pair's {key!r} decoder")
        out[key] = checkpoint
    return out


def load_uncond(cfg: ExportConfig, dataset: str, c_shape: tuple[int, ...]) -> np.ndarray:
    """(T, D) float32 empty-prompt text states of the dataset's targets file."""
    path = Path(cfg.targets_dir) / f"{dataset}.h5"
    if not path.is_file():
        raise FileNotFoundError(f"missing targets file {path} (it holds the unconditional embedding); run targets first")
    with h5py.File(path, "r") as f:
        uncond = np.asarray(f["uncond"], np.float32)
    if uncond.shape != tuple(c_shape):
        raise ExportError(f"{path}: uncond has shape {uncond.shape}; the c-decoder predicts {tuple(c_shape)}")
    return uncond


def check_z_fits(z_shape: tuple[int, ...], pipe) -> None:
    """The z-decoder must predict square latents with the VAE's channel count."""
    channels = int(pipe.vae.config.latent_channels)
    if len(z_shape) != 3 or z_shape[0] != channels or z_shape[1] != z_shape[2]:
        raise ExportError(f"the z-decoder predicts {tuple(z_shape)}; the image model needs square latents "
                          f"({channels}, h, h)")


def export_graphs(cfg: ExportConfig, specs: list, bundle: Path) -> tuple[dict[str, bf.ModelEntry], dict[str, dict]]:
    """Export and check each graph into ``bundle``'s models folder. Returns the manifest entries,
    name -> ModelEntry, and the checks, name -> {max_abs: {output: float}, atol[, fp16_*]}."""
    (bundle / bf.MODELS_DIR).mkdir()
    entries, checks = {}, {}
    for spec in tqdm(specs, desc="export onnx", unit="graph"):
        rel = bf.model_file(spec.name)
        onnx_models.export_graph(spec, bundle / rel, cfg.opset)
        checks[spec.name] = {"max_abs": onnx_models.check_graph(spec, bundle / rel), "atol": spec.atol}
        inputs, outputs = onnx_models.io_names(bundle / rel)
        entries[spec.name] = bf.ModelEntry(file=rel, dtype=GRAPH_DTYPE, inputs=inputs, outputs=outputs)
        if cfg.fp16 and spec.name in bf.FP16_MODELS:
            half = bf.model_file(spec.name, fp16=True)
            onnx_models.export_fp16(spec, bundle / half, cfg.opset)
            entries[spec.name] = dataclasses.replace(entries[spec.name], fp16_file=half)
            checks[spec.name]["fp16_max_abs_vs_fp32"] = onnx_models.check_graph(spec, bundle / half, cfg.fp16_atol)
            checks[spec.name]["fp16_atol"] = cfg.fp16_atol
    return entries, checks


def save_arrays(bundle: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write each array (every name of bf.ARRAY_NAMES) to its place in ``bundle``; returns name -> relative path."""
    if sorted(arrays) != sorted(bf.ARRAY_NAMES):
        raise ExportError(f"bundle arrays {sorted(arrays)}; the bundle format has {sorted(bf.ARRAY_NAMES)}")
    (bundle / bf.ARRAYS_DIR).mkdir()
    out = {}
    for name, array in arrays.items():
        out[name] = bf.array_file(name)
        np.save(bundle / out[name], np.ascontiguousarray(array), allow_pickle=False)
    return out


def _graph_specs(cfg: ExportConfig, pipe, checkpoints: dict, resolution: int, text_shape) -> list:
    specs = [onnx_models.decoder_graph(f"{key}_decoder", ck.predictor(), ck.spec.n_voxels, cfg.decoder_atol,
                                       cfg.check_batch, cfg.check_seed) for key, ck in checkpoints.items()]
    atols = {"unet": cfg.unet_atol, "vae": cfg.vae_atol}
    z_side = int(checkpoints["z"].spec.target_shape[-1])
    return specs + onnx_models.image_model_graphs(pipe, resolution, text_shape, atols, cfg.check_batch, cfg.check_seed,
                                                  z_side)


def _image_model(rc: ReconstructConfig, pipe, resolution: int, text_shape: tuple[int, ...]) -> bf.ImageModel:
    factor = int(pipe.vae_scale_factor)
    side = resolution // factor
    return bf.ImageModel(source=str(rc.model), latent_shape=(int(pipe.vae.config.latent_channels), side, side),
                         scaling_factor=float(pipe.vae.config.scaling_factor), vae_scale_factor=factor,
                         resolution=resolution, native_resolution=native_resolution(pipe), text_shape=text_shape)


def _manifest(prepared: dict, rc: ReconstructConfig, pair_name: str, checkpoints: dict, pipe, resolution: int,
              arrays: dict[str, str], parts: dict) -> bf.Manifest:
    """The bundle's manifest; ``parts`` holds the entries made along the way: models, tensorrt, files, config."""
    pair = rc.pairs[pair_name]
    decoders_entry = {key: bf.DecoderEntry(name=getattr(pair, key), kind=ck.spec.kind, model=bf.decoder_model(key),
                                           input_rois=tuple(ck.spec.input_rois), columns=arrays[f"columns_{key}"],
                                           n_inputs=ck.spec.n_voxels, target_shape=tuple(ck.spec.target_shape))
                      for key, ck in checkpoints.items()}
    return bf.Manifest(
        format_version=bf.FORMAT_VERSION,
        created_by=bf.CreatedBy(module="brainldm.export.export", torch=torch.__version__,
                                onnxruntime=onnx_models.ort.__version__),
        dataset=prepared["dataset"], subject=prepared["subject"], source=prepared["source"], pair=pair_name,
        input=bf.InputLayout(layout=INPUT_LAYOUT, voxel_ids=arrays["voxel_ids"],
                             n_voxels=int(len(prepared["voxel_ids"])), sessions=tuple(prepared["sessions"].tolist())),
        normalisation=bf.Normalisation(sessions=arrays["norm_sessions"], mean=arrays["norm_mean"],
                                       std=arrays["norm_std"], formula=NORMALISATION_FORMULA),
        decoders=decoders_entry,
        graph=prepared["graph"],
        image_model=_image_model(rc, pipe, resolution, tuple(checkpoints["c"].spec.target_shape)),
        scheduler=bf.Scheduler(config=dict(pipe.scheduler.config), alphas_cumprod=arrays["alphas_cumprod"]),
        generation=bf.Generation(steps=rc.steps, strength=rc.strength, guidance=rc.guidance, samples=rc.samples,
                                 seed=rc.seed, encode_mode=rc.encode_mode),
        uncond=arrays["uncond"],
        **parts,
    )


def run(cfg: ExportConfig, rc: ReconstructConfig, dataset: str, pair: str) -> Path:
    """Export the pair ``pair`` of ``rc.pairs`` for ``dataset``; returns the bundle folder."""
    if pair not in rc.pairs:
        raise ConfigError(f"unknown pair '{pair}'; configured pairs (reconstruct.pairs): {sorted(rc.pairs)}")
    check_encode_mode(rc.encode_mode, "reconstruct.encode_mode")
    # 1. Inputs: prepared layout, decoders, image model, unconditional states.
    prepared = read_prepared(Path(cfg.prepared_dir) / f"{dataset}.h5")
    checkpoints = load_pair(cfg, dataset, rc.pairs[pair])
    columns = {k: decoder_columns(ck, prepared["columns"], f"decoder '{getattr(rc.pairs[pair], k)}'")
               for k, ck in checkpoints.items()}
    uncond = load_uncond(cfg, dataset, checkpoints["c"].spec.target_shape)
    pipe = load_reference_pipeline(rc.model)
    resolution = rc.resolution or native_resolution(pipe)
    check_z_fits(checkpoints["z"].spec.target_shape, pipe)
    out = Path(cfg.out_dir) / f"{dataset}-{pair}"
    with atomic_path(out, suffix="") as tmp:
        tmp.mkdir()
        # 2. Graphs, each checked against torch (raises before anything is renamed into place).
        models, checks = export_graphs(cfg, _graph_specs(cfg, pipe, checkpoints, resolution, uncond.shape), tmp)
        # 3. Arrays the runtime needs.
        arrays = save_arrays(tmp, {
            "voxel_ids": prepared["voxel_ids"], "norm_sessions": prepared["sessions"], "norm_mean": prepared["mean"],
            "norm_std": prepared["std"], "columns_z": columns["z"], "columns_c": columns["c"], "uncond": uncond,
            "alphas_cumprod": pipe.scheduler.alphas_cumprod.numpy().astype(np.float32)})
        # 4. Optional TensorRT engines, then the manifest with every file's hash.
        sides = (int(checkpoints["z"].spec.target_shape[-1]), resolution // int(pipe.vae_scale_factor))
        trt = tensorrt_engines.build_all(tmp, models, cfg.trt_batch_sizes, sides) if cfg.tensorrt else None
        files = {p.relative_to(tmp).as_posix(): bf.file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        config = {"export": config_to_record(cfg), "reconstruct": config_to_record(rc)}
        bf.write_manifest(tmp, _manifest(prepared, rc, pair, checkpoints, pipe, resolution, arrays,
                                         {"models": models, "tensorrt": trt, "files": files, "config": config}))
    # 5. The checks' numbers, beside the bundle (written after it, so they never describe another one).
    write_text_atomic(Path(cfg.checks_dir) / f"{dataset}-{pair}.json",
                      json.dumps({"graphs": checks, "bundle": str(out)}, indent=1, sort_keys=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--pair", required=True, help="a key of reconstruct.pairs, e.g. ours")
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_config(ExportConfig, "export", args.params)
        rc = load_config(ReconstructConfig, "reconstruct", args.params)
        torch.manual_seed(cfg.check_seed)
        return f"wrote {run(cfg, rc, args.dataset, args.pair)}"
    return run_stage(work, errors=(onnx_models.ExportParityError,))


if __name__ == "__main__":
    sys.exit(main())
