"""Stage ``simulate``: the simulated subject, written in NSD's and THINGS-fMRI's own formats.

``python -m brainldm.train.simulation.simulate --params params.yaml`` writes ``sim-nsd`` and
``sim-things`` (each built in a temporary folder and renamed at the end). Stimuli are
procedural scenes (:mod:`brainldm.train.simulation.scenes`); responses come from the voxel-wise
encoding model (:mod:`brainldm.train.simulation.encoding`); the files follow the formats of
docs/data-formats.md (:mod:`brainldm.train.simulation.formats`). Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.runtime.preprocess import NSD_INT16_SCALE
from brainldm.train.simulation import encoding, scenes
from brainldm.train.simulation import formats as fmt
from brainldm.train.config import config_to_dict, load_config, run_stage
from brainldm.train.simulation.design import NsdDesign, ThingsDesign, nsd_design, nsd_repeats, runs_and_trials, repeats_of_test_images, things_design

NSD_AREAS = ("V1", "V2", "V3", "hV4", "mid", "high")  # keys of NsdSimConfig.roi_voxels, in layout order
NSD_BETAS_DIR = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
VAL_SPLIT_FRACTION = 0.05  # share of COCO ids in val2017
COCO_ID_RANGE = 600_000
MAX_CROP = 0.2  # cropBox fractions (top, bottom, left, right) are drawn below this
# THINGS ROI: (direction, bilateral?, area class of the encoding model), in layout order.
THINGS_ROIS = {
    "V1": ("any", False, "V1"), "V2": ("any", False, "V2"), "V3": ("any", False, "V3"),
    "hV4": ("ventral", False, "hV4"), "V3a": ("dorsal", False, "mid"), "V3b": ("dorsal", False, "mid"),
    "LO1": ("lateral", False, "mid"), "LO2": ("lateral", False, "mid"), "VO1": ("ventral", False, "high"),
    "VO2": ("ventral", False, "high"), "TO1": ("lateral", False, "high"), "TO2": ("lateral", False, "high"),
    "OFA": ("lateral", True, "high"), "FFA": ("ventral", True, "high"), "PPA": ("ventral", True, "high"),
    "LOC": ("lateral", True, "high"), "EBA": ("lateral", True, "high"), "STS": ("lateral", True, "high"),
    "RSC": ("dorsal", True, "high"), "TOS": ("dorsal", True, "high"),
}
THINGS_COLUMN_NAMES = {"LO1": "LO1 (prf)", "LO2": "LO2 (prf)"}


@dataclass(frozen=True)
class NsdSimConfig:
    """sim-nsd: subject 1 sees shared + unique images, each ``n_repeats`` times."""

    root: str = "data/raw/sim-nsd"
    n_sessions: int = 12
    runs_per_session: int = 12
    n_unique_images: int = 1000  # subject 1's own images
    n_shared_images: int = 60  # seen by all 8 subjects (sharedix: the test set)
    n_extra_images: int = 200  # pool images that only other subjects see
    n_repeats: int = 3
    n_subjects: int = 8
    grid: tuple[int, ...] = (18, 22, 18)  # (X, Y, Z) voxels
    voxel_size_mm: float = 1.8
    roi_voxels: dict[str, int] = field(default_factory=lambda: {"V1": 380, "V2": 340, "V3": 300, "hV4": 180,
                                                                "mid": 300, "high": 700})
    betas_format: str = "hdf5"  # "hdf5" (Z, Y, X per trial) or "nifti" (X, Y, Z, trials)


@dataclass(frozen=True)
class ThingsSimConfig:
    """sim-things: training images shown once; test images once per session."""

    root: str = "data/raw/sim-things"
    n_train_images: int = 1100
    n_test_images: int = 60
    n_sessions: int = 12
    runs_per_session: int = 10
    grid: tuple[int, ...] = (18, 22, 18)
    voxel_size_mm: float = 2.0
    roi_voxels: dict[str, int] = field(default_factory=lambda: {  # bilateral ROIs (FFA, ...): per hemisphere
        "V1": 300, "V2": 260, "V3": 220, "hV4": 130, "V3a": 50, "V3b": 40, "LO1": 50, "LO2": 50, "VO1": 50,
        "VO2": 40, "TO1": 40, "TO2": 40, "OFA": 25, "FFA": 40, "PPA": 40, "LOC": 50, "EBA": 30, "STS": 25,
        "RSC": 25, "TOS": 25})
    value_quantum: float = 1.0 / 64  # betas rounded to this (compresses well; far below the noise)
    jpeg_quality: int = 90


@dataclass(frozen=True)
class SimulateConfig:
    """The ``simulate`` params section."""

    seed: int = 0
    image_size: int = 64
    n_captions: int = 5
    max_objects: int = 3
    datasets: tuple[str, ...] = ("sim-nsd", "sim-things")
    encoding: encoding.EncodingConfig = field(default_factory=encoding.EncodingConfig)
    nsd: NsdSimConfig = field(default_factory=NsdSimConfig)
    things: ThingsSimConfig = field(default_factory=ThingsSimConfig)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent generator per purpose, so changing one count leaves the other streams alone."""
    return np.random.default_rng([seed, *stream.encode()])


@dataclass(frozen=True)
class Truth:
    """One simulated dataset's known truth before noise: stimuli, voxels, noise-free signal (V model voxels)."""

    design: NsdDesign | ThingsDesign
    images: np.ndarray  # (P, S, S, 3) uint8 stimulus pool
    texts: list  # (P,) captions per pool image
    scene_list: list  # (P,) scenes.Scene
    layout: encoding.Layout
    mask: np.ndarray  # (X, Y, Z) bool: the model's voxels, in C order
    roi_names: np.ndarray  # (V,) str layout ROI name per voxel ("" outside every ROI)
    model: encoding.VoxelModel
    signal: np.ndarray  # (N, V) float32 noise-free response, z-scored per voxel over its N rows
    image_ids: np.ndarray  # (N,) int64 native id of each signal row (docs/prepared_schema.md image_ids)
    voxel_ids: np.ndarray  # (V,) int64 flat C-order index of each voxel into the (X, Y, Z) grid


def simulated_truth(config: SimulateConfig, dataset: str) -> Truth:
    """``dataset``'s design, stimuli, voxels and noise-free signal, each from its own seeded stream. Signal rows:
    sim-nsd subject 1's images (native id: 0-based 73k id); sim-things every image row, training then test
    (native id: the row of the image's first trial in the stimulus metadata)."""
    if dataset not in BUILDERS:
        raise ValueError(f"simulate: unknown dataset {dataset!r}; expected one of {list(BUILDERS)}")
    name, c = BUILDERS[dataset][1], getattr(config, BUILDERS[dataset][1])  # "nsd" | "things" and its section
    # 1. Design, ROI plan (ROI -> area class of the encoding model) and the images the subject sees.
    if name == "nsd":
        if set(c.roi_voxels) != set(NSD_AREAS):
            raise ValueError(f"nsd.roi_voxels: keys must be {list(NSD_AREAS)}; got {sorted(c.roi_voxels)}")
        design = nsd_design(c, _rng(config.seed, "nsd-design"))
        plan, classes = [(a, c.roi_voxels[a], "ventral" if a == "hV4" else "any", "") for a in NSD_AREAS], {}
        n_images = c.n_shared_images + c.n_unique_images + c.n_extra_images
        rows = image_ids = design.subjectim[0] - 1
    else:
        design = things_design(c, _rng(config.seed, "things-design"))
        plan, classes = things_plan(c)
        n_images = c.n_train_images + c.n_test_images
        rows, image_ids = np.arange(n_images), np.unique(design.image, return_index=True)[1]  # all are shown
    # 2. Stimuli, voxels and their noise-free responses.
    scene_seed = int(_rng(config.seed, f"{name}-scenes").integers(2**31))
    images, texts, _, scene_list = scenes.generate(n_images, scene_seed, config.image_size, config.n_captions,
                                                   config.max_objects)
    layout = encoding.brain_layout(tuple(c.grid), plan, _rng(config.seed, f"{name}-layout"))
    mask = layout.roi >= 0
    roi_names = np.array(["", *layout.names])[layout.roi[mask]]
    area = np.array([classes.get(n, "") for n in roi_names]) if classes else roi_names  # NSD: ROI = area
    fields = encoding.visual_field(layout, area, mask)
    model = encoding.build_voxels(area, *fields, config.encoding, _rng(config.seed, f"{name}-voxels"))
    signal = encoding.voxel_signal(model, images[rows], encoding.semantic_features([scene_list[i] for i in rows]),
                                   config.encoding)
    return Truth(design, images, texts, scene_list, layout, mask, roi_names, model, signal,
                 np.asarray(image_ids, dtype=np.int64), np.flatnonzero(mask.ravel()))


def simulate_nsd(config: SimulateConfig, root: Path) -> dict:
    """Write sim-nsd under ``root`` (a new folder). Returns a summary dict."""
    c, enc = config.nsd, config.encoding
    if c.betas_format not in ("hdf5", "nifti"):
        raise ValueError(f"nsd.betas_format: expected 'hdf5' or 'nifti', got {c.betas_format!r}")
    # 1. Design, stimuli, voxels and their noise-free signal; 2. responses to subject 1's trials.
    truth = simulated_truth(config, "sim-nsd")
    session, run, trial = runs_and_trials(truth.design.trials_per_session, c.runs_per_session)
    betas = encoding.simulate_trials(truth.model, truth.signal, truth.design.masterordering - 1, session - 1, enc,
                                     _rng(config.seed, "nsd-trials"))
    # 3. Files.
    coco = _coco_identity(len(truth.images), _rng(config.seed, "nsd-coco"))
    _write_nsd_tables(config, root, truth.design, coco, (session, run, trial))
    _write_nsd_stimuli(root, truth.images, truth.texts, coco, config.image_size)
    _write_nsd_rois(root, truth.layout, c)
    _write_nsd_betas(root, betas, truth.mask, truth.design.trials_per_session, c)
    return {"images": len(truth.images), "trials": len(betas), "sessions": c.n_sessions,
            "brain_voxels": int(truth.mask.sum()), "roi_voxels": int((truth.layout.roi > 0).sum())}


def _coco_identity(n_pool: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unique COCO ids (P,) int64, their split (P,) str and NSD-style cropBox strings."""
    coco_ids = np.sort(rng.choice(COCO_ID_RANGE, n_pool, replace=False)) + 1
    coco_ids = rng.permutation(coco_ids)
    split = np.where(rng.random(n_pool) < VAL_SPLIT_FRACTION, "val2017", "train2017")
    crops = np.round(rng.uniform(0, MAX_CROP, (n_pool, 2)), 4)
    # NSD crops along one axis only: (top, bottom, left, right).
    boxes = [f"({a}, {a}, 0, 0)" if k % 2 else f"(0, 0, {b}, {b})" for k, (a, b) in enumerate(crops)]
    return coco_ids.astype(np.int64), split, boxes


def _write_nsd_tables(config: SimulateConfig, root: Path, design: NsdDesign, coco: tuple, trials: tuple) -> None:
    """nsd_expdesign.mat, nsd_stim_info_merged.csv and subject 1's responses.tsv."""
    expdir = root / "nsddata/experiments/nsd"
    expdir.mkdir(parents=True)
    fmt.write_mat(expdir / "nsd_expdesign.mat", {
        "masterordering": design.masterordering[None, :], "subjectim": design.subjectim,
        "sharedix": design.sharedix[None, :],
    })
    n_pool = len(coco[0])
    seen, reps = nsd_repeats(design, n_pool, config.nsd.n_repeats)
    shared = np.isin(np.arange(n_pool), design.sharedix - 1)
    fmt.nsd_stim_info(coco[0], coco[1], coco[2], shared, seen, reps).to_csv(expdir / "nsd_stim_info_merged.csv")
    behav = root / "nsddata/ppdata/subj01/behav"
    behav.mkdir(parents=True)
    session, run, trial = trials
    nsd_ids = design.subjectim[0, design.masterordering - 1] - 1
    table = fmt.nsd_responses(1, session, run, trial, nsd_ids, design.masterordering, _rng(config.seed, "nsd-behav"))
    table.to_csv(behav / "responses.tsv", sep="\t", index=False)


def _write_nsd_stimuli(root: Path, images: np.ndarray, texts: list, coco: tuple, size: int) -> None:
    """imgBrick HDF5 and COCO caption JSONs (split by cocoSplit)."""
    stim = root / "nsddata_stimuli/stimuli/nsd"
    (stim / "annotations").mkdir(parents=True)
    fmt.write_h5(stim / "nsd_stimuli.hdf5", "imgBrick", images, chunks=(1, *images.shape[1:]))
    coco_ids, split, _ = coco
    first_id = 1
    for name in ("train2017", "val2017"):
        rows = np.flatnonzero(split == name)
        content = fmt.coco_captions(coco_ids[rows], [texts[i] for i in rows], size, first_id)
        first_id += len(content["annotations"])
        fmt.write_json(stim / f"annotations/captions_{name.removesuffix('2017')}2017.json", content)


def _write_nsd_rois(root: Path, layout: encoding.Layout, c: NsdSimConfig) -> None:
    """ROI NIfTIs (X, Y, Z) int16 and the fsaverage ctab label files."""
    roidir = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roidir.mkdir(parents=True)
    affine = fmt.grid_affine(tuple(c.grid), c.voxel_size_mm)
    for name, volume in fmt.nsd_roi_volumes(layout).items():
        (roidir / f"{name}.nii.gz").write_bytes(fmt.nifti_gz_bytes(volume, affine))
    labeldir = root / "nsddata/freesurfer/fsaverage/label"
    labeldir.mkdir(parents=True)
    for name, labels in (("prf-visualrois", fmt.NSD_PRF_LABELS), ("streams", fmt.NSD_STREAM_LABELS),
                         ("nsdgeneral", fmt.NSD_GENERAL_LABELS)):
        fmt.write_ctab(labeldir / f"{name}.mgz.ctab", labels)


def _write_nsd_betas(root: Path, betas: np.ndarray, mask: np.ndarray, per_session: list[int], c: NsdSimConfig) -> None:
    """betas_sessionNN.hdf5 (T_s, Z, Y, X) or .nii.gz (X, Y, Z, T_s), int16 percent x 300, 0 outside brain."""
    outdir = root / NSD_BETAS_DIR
    outdir.mkdir(parents=True)
    scaled = np.clip(np.rint(betas * NSD_INT16_SCALE), np.iinfo(np.int16).min, np.iinfo(np.int16).max)
    affine = fmt.grid_affine(tuple(c.grid), c.voxel_size_mm)
    start = 0
    for s, n in enumerate(tqdm(per_session, desc="sim-nsd betas", leave=False), start=1):
        volume = np.zeros((n, *mask.shape), dtype=np.int16)
        volume[:, mask] = scaled[start : start + n]
        start += n
        if c.betas_format == "hdf5":
            fmt.write_h5(outdir / f"betas_session{s:02d}.hdf5", "betas",
                         np.ascontiguousarray(volume.transpose(0, 3, 2, 1)), chunks=(1, *mask.shape[::-1]))
        else:
            data = np.ascontiguousarray(volume.transpose(1, 2, 3, 0))
            (outdir / f"betas_session{s:02d}.nii.gz").write_bytes(fmt.nifti_gz_bytes(data, affine))


def things_plan(c: ThingsSimConfig) -> tuple[list[tuple[str, int, str, str]], dict[str, str]]:
    """Layout plan (hemisphere-split category ROIs) and each ROI's encoding area class."""
    unknown = sorted(set(c.roi_voxels) - set(THINGS_ROIS))
    if unknown:
        raise ValueError(f"things.roi_voxels: unknown ROI(s) {unknown}; allowed: {list(THINGS_ROIS)}")
    plan, classes = [], {}
    for name, (where, bilateral, area_class) in THINGS_ROIS.items():
        for hemisphere in ("l", "r") if bilateral else ("",):
            column = hemisphere + THINGS_COLUMN_NAMES.get(name, name)
            plan.append((column, c.roi_voxels.get(name, 0), where, hemisphere))
            classes[column] = area_class
    return plan, classes


def simulate_things(config: SimulateConfig, root: Path) -> dict:
    """Write sim-things under ``root`` (a new folder). Returns a summary dict."""
    c, enc = config.things, config.encoding
    # 1. Design, stimuli, voxels and their noise-free signal; concept = main object's colour and kind.
    truth = simulated_truth(config, "sim-things")
    design, images, layout, mask, model = truth.design, truth.images, truth.layout, truth.mask, truth.model
    concepts = [f"{s.objects[0].colour}_{s.objects[0].kind}" for s in truth.scene_list]
    names = [f"{k}_{concepts[: i + 1].count(k):02d}s.jpg" for i, k in enumerate(concepts)]  # k's n-th image
    # 2. Responses.
    betas = encoding.simulate_trials(model, truth.signal, design.image, design.session - 1, enc,
                                     _rng(config.seed, "things-trials"))
    betas = (np.round(betas / c.value_quantum) * c.value_quantum).astype(np.float32)
    # 3. Files.
    tables_dir = root / "betas_csv"
    tables_dir.mkdir(parents=True)
    fmt.write_response_data(tables_dir / "sub-01_ResponseData.h5", truth.voxel_ids, np.ascontiguousarray(betas.T))
    fmt.things_voxel_metadata(truth.voxel_ids, mask.shape, truth.roi_names, model,
                              repeats_of_test_images(betas, design)).to_csv(tables_dir / "sub-01_VoxelMetadata.csv", index=False)
    fmt.things_stimulus_metadata(design.is_test, design.session, design.run, [names[i] for i in design.image]).to_csv(
        tables_dir / "sub-01_StimulusMetadata.csv", index=False)
    for image, concept, name in zip(tqdm(images, desc="sim-things images", leave=False), concepts, names):
        folder = root / "object_images" / concept
        folder.mkdir(parents=True, exist_ok=True)
        fmt.write_jpeg(folder / name, image, c.jpeg_quality)
    fmt.things_concepts(sorted(set(concepts))).to_csv(root / "things_concepts.tsv", sep="\t", index=False)
    return {"images": len(images), "trials": len(betas), "sessions": c.n_sessions, "voxels": int(mask.sum()),
            "roi_voxels": int((layout.roi > 0).sum()), "concepts": len(set(concepts))}


BUILDERS = {"sim-nsd": (simulate_nsd, "nsd"), "sim-things": (simulate_things, "things")}


def disk_usage(root: Path) -> tuple[int, int]:
    """(number of files, total bytes) under ``root``."""
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def run(config: SimulateConfig, datasets: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Build each dataset in a temporary folder next to its root and rename it into place.
    Returns dataset name -> summary (counts, files, bytes, seconds)."""
    names = tuple(datasets or config.datasets)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"simulate: unknown dataset(s) {unknown}; expected some of {list(BUILDERS)}")
    summaries = {}
    for name in names:
        builder, section = BUILDERS[name]
        root = Path(getattr(config, section).root)
        start = time.perf_counter()
        with atomic_path(root, suffix="") as tmp:
            summary = builder(config, tmp)
            summary["files"], summary["bytes"] = disk_usage(tmp)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        summaries[name] = summary
    return summaries


class SimulateError(ValueError):
    """The existing data is not what the seed and params produce."""


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def verify(config: SimulateConfig, report: Path) -> dict[str, bool]:
    """Regenerate every dataset in a scratch folder and compare it, file by file, with its root.

    This is the pipeline's `simulate` stage: the raw data is versioned by data.dvc, and this
    stage proves that it is exactly what the seed and params produce. Writes a JSON report.
    """
    results, details = {}, {}
    with tempfile.TemporaryDirectory(prefix="simulate-verify-") as scratch:
        fresh = dataclasses.replace(config, nsd=dataclasses.replace(config.nsd, root=str(Path(scratch) / "sim-nsd")),
                                    things=dataclasses.replace(config.things, root=str(Path(scratch) / "sim-things")))
        run(fresh)
        for name, (_, section) in BUILDERS.items():
            if name not in config.datasets:
                continue
            expected = tree_digest(Path(getattr(fresh, section).root))
            found = tree_digest(Path(getattr(config, section).root))
            differing = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            results[name] = not differing
            details[name] = {"files": len(expected), "identical": not differing, "differing": differing[:20]}
    write_text_atomic(report, json.dumps({"reproducible": details, "config": config_to_dict(config)}, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m brainldm.train.simulation.simulate --params params.yaml [--dataset sim-nsd]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params YAML with a 'simulate' section")
    parser.add_argument("--dataset", action="append", choices=sorted(BUILDERS),
                        help="build only this dataset (repeatable; default: simulate.datasets)")
    parser.add_argument("--verify", metavar="REPORT_JSON",
                        help="regenerate in a scratch folder, compare with the existing data, write a report")
    args = parser.parse_args(argv)

    def work() -> str:
        config = load_config(SimulateConfig, "simulate", args.params)
        if args.verify:
            results = verify(config, Path(args.verify))
            summary = "simulate --verify: " + ", ".join(f"{k} {'identical' if ok else 'DIFFERS'}"
                                                        for k, ok in results.items())
            if not all(results.values()):
                raise SimulateError(f"{summary}: the data is not what seed {config.seed} and params give "
                                    f"(differing files in {args.verify})")
            return summary
        start = time.perf_counter()
        summaries = run(config, tuple(args.dataset) if args.dataset else None)
        return build_report(summaries, time.perf_counter() - start, config.seed)
    return run_stage(work)


def build_report(summaries: dict[str, dict], seconds: float, seed: int) -> str:
    """One line per dataset built (its summary, MB, seconds), then the total."""
    lines = []
    for name, summary in summaries.items():
        details = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("bytes", "seconds"))
        lines.append(f"{name}: {details}, {summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s")
    total = sum(s["bytes"] for s in summaries.values())
    lines.append(f"simulate: {total / 1e6:.1f} MB in {seconds:.1f} s (seed {seed})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
