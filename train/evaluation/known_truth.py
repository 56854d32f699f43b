"""Stage ``known_truth``: what only a simulated subject can tell: each voxel's true noise ceiling, the
best linear read-out of a noise-free brain, and each decoder's share of it.

``python -m brainldm.train.evaluation.known_truth --dataset NAME`` rebuilds the subject's voxel model and
noise-free signal from params.yaml's ``simulate`` section with the function that wrote data/raw
(``simulate.simulated_truth``: same seeded streams), maps them onto ``data/prepared/<dataset>.h5`` by voxel
and image ids, and writes ``results/known_truth/<dataset>.json``:

* ``noise_ceiling``: per voxel NC = 100 S / (S + N / n) of the test split's repeat average, from the model's
  amplitude (S), noise_sd (N) and the test images' repeats (n); per ROI median and mean, beside the data's
  estimate from the prepared test trials, THINGS' VoxelMetadata ``nc_testset`` and r(signal, test split).
* ``oracle``: the ridge of the fit decoders ``known_truth.oracle`` names (ridge-z, ridge-c: same alphas,
  folds, input ROIs and training rows) fitted on noise-free responses; test metrics as ``decode``'s.
* ``shares``: each decoder's test pearson_dim and identification over the oracle's for its target.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.config import ConfigError, config_to_dict, config_to_record, load_config, run_stage
from brainldm.train.data.splits import check_aligned, load_targets, split_image_index
from brainldm.train.decoding.decode import IDENTIFICATION_CHANCE, stage1_metrics
from brainldm.train.decoding.fit_config import DecoderConfig, FitConfig, decoder_config
from brainldm.train.decoding.ridge import RidgeModel, fit_ridge_cv
from brainldm.train.evaluation import metrics
from brainldm.train.simulation import formats, simulate
from brainldm.train.simulation.simulate import SimulateConfig

# THINGS-fMRI's voxel table under the dataset root (train/data/things.py VOXELS; not imported: the loader
# would pull the whole prepare stage into this stage's deps).
THINGS_VOXELS = "betas_csv/sub-{:02d}_VoxelMetadata.csv"
TARGETS = ("z", "c")


@dataclass(frozen=True)
class KnownTruthConfig:
    """Params section ``known_truth``: the oracle's fit decoder per target, the decoders to share out,
    and the folders read and written."""

    oracle: dict[str, str] = field(default_factory=lambda: {"z": "ridge-z", "c": "ridge-c"})
    decoders: tuple[str, ...] = ()  # decoders whose results/decode JSON is compared with the oracle
    prepared_dir: str = "data/prepared"
    targets_dir: str = "data/targets"
    decode_dir: str = "results/decode"
    out_dir: str = "results/known_truth"


@dataclass(frozen=True)
class PreparedTruth:
    """The simulation's truth on a prepared file's layout: V = the union of its ROI voxels (norm/voxel_ids
    order), N = its images."""

    signal: np.ndarray  # (N, V) float32 noise-free signal (unit variance over the simulated images)
    amplitude: np.ndarray  # (V,) float32 percent signal change per unit signal
    columns: dict[str, np.ndarray]  # ROI -> (V_roi,) int64 columns of V
    train: np.ndarray  # (n_train,) int64 image row of every training trial (the fit stage's rows)
    test: np.ndarray  # (n_test,) int64 image row of every test sample (repeats averaged)

    def responses(self) -> np.ndarray:
        """Noise-free responses (N, V) float32 in percent: amplitude * signal (baseline, drift and noise left out)."""
        return self.signal * self.amplitude


def simulated_dataset(sim: SimulateConfig, prepared: Path) -> tuple[str, dict]:
    """The simulate dataset (sim-nsd | sim-things) that ``prepared`` was made from, and its prepare entry.

    Raises ValueError unless the file's recorded root is the simulate stage's output for its source.
    """
    if not prepared.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {prepared} (run the prepare stage first)")
    with h5py.File(prepared, "r") as f:
        name, source = str(f.attrs["dataset"]), str(f.attrs["source"])
        entry = json.loads(f.attrs["config"])["datasets"][name]
    by_section = {section: dataset for dataset, (_, section) in simulate.BUILDERS.items()}
    simulated = getattr(sim, source).root if source in by_section else None
    if simulated is None or Path(entry["root"]).resolve() != Path(simulated).resolve():
        raise ValueError(f"known truth exists only for simulated subjects: {prepared} was prepared from "
                         f"{entry['root']}, not the simulate stage's {source} output {simulated}")
    return by_section[source], entry


def _positions(known: np.ndarray, wanted: np.ndarray, what: str, prepared: Path) -> np.ndarray:
    """Index into ``known`` (unique ids) of every id in ``wanted``; ValueError naming ids without truth."""
    order = np.argsort(known, kind="stable")
    at = np.clip(np.searchsorted(known[order], wanted), 0, len(known) - 1)
    missing = wanted[known[order][at] != wanted]
    if len(missing):
        raise ValueError(f"{prepared}: {len(missing)} {what} have no simulated truth (e.g. {missing[:5].tolist()}); "
                         "the prepared file does not belong to these simulate params")
    return order[at]


def on_prepared(truth: simulate.Truth, prepared: Path) -> PreparedTruth:
    """Map ``truth`` onto ``prepared``: voxels by raw-layout id (flat C-order index into the grid; THINGS'
    voxel_id is the same index), images by native id (docs/prepared_schema.md image_ids)."""
    with h5py.File(prepared, "r") as f:
        voxel_ids = np.asarray(f["norm/voxel_ids"], dtype=np.int64)
        image_ids = np.asarray(f["image_ids"], dtype=np.int64)
        columns = {roi: np.asarray(f[f"rois/{roi}/columns"], dtype=np.int64) for roi in f["rois"]}
    voxels = _positions(truth.voxel_ids, voxel_ids, "voxels", prepared)
    rows = _positions(truth.image_ids, image_ids, "images", prepared)
    return PreparedTruth(signal=truth.signal[rows][:, voxels], amplitude=truth.model.amplitude[voxels],
                         columns=columns, train=split_image_index(prepared, "train"),
                         test=split_image_index(prepared, "test"))


def noise_ceiling(amplitude: np.ndarray, signal_test: np.ndarray, noise_sd: float, repeats: np.ndarray) -> np.ndarray:
    """Known NC (percent) of the repeat-averaged test response of every voxel: (V,) float64.

    S = variance over the test images (ddof 0) of amplitude * signal, signal_test (n_test, V); N = noise_sd^2;
    the average of n_i repeats carries N / n_i, so N / n uses 1/n = mean of 1/n_i over the test images
    (repeats (n_test,)). A trial is gain_s (baseline + amplitude signal + noise) + offset_s for session s:
    the gain scales signal and noise alike (it cancels in S / N), and prepare z-scores each session with
    its own training mean and std, which removes the offset and, up to estimation error, the gain; so the
    prepared test split's NC depends on neither. (Raw betas averaged across sessions do carry them.)
    """
    signal_var = (amplitude.astype(np.float64) * signal_test).var(axis=0)
    noise_var = noise_sd**2 * np.mean(1.0 / np.asarray(repeats, dtype=np.float64))
    total = signal_var + noise_var
    return np.where(total > 0, 100 * signal_var / np.where(total > 0, total, 1), 0.0)  # no signal, no noise: 0


def repeated_test_trials(prepared: Path) -> tuple[np.ndarray | None, np.ndarray]:
    """Prepared test trials z-scored as prepare does (their session's training statistics), grouped by
    image: (n_test, R, V_all) float32, or None where images have unequal repeats; repeats per test image."""
    with h5py.File(prepared, "r") as f:
        betas, session = np.asarray(f["raw_test/betas"]), np.asarray(f["raw_test/session"], dtype=np.int64)
        image = np.asarray(f["raw_test/image_index"], dtype=np.int64)
        sessions, mean, std = (np.asarray(f[f"norm/{k}"]) for k in ("sessions", "mean", "std"))
        test = np.asarray(f["splits/test/image_index"], dtype=np.int64)
    at = np.searchsorted(sessions, session)
    z = (betas - mean[at]) / std[at]
    repeats = np.array([np.count_nonzero(image == i) for i in test])
    if len(set(repeats.tolist())) != 1:
        return None, repeats
    return np.stack([z[image == i] for i in test]), repeats


def things_nc_testset(entry: dict, voxel_ids: np.ndarray) -> np.ndarray:
    """THINGS' data-estimated ``nc_testset`` (percent, raw betas) of ``voxel_ids`` (V,) from VoxelMetadata."""
    table = pd.read_csv(Path(entry["root"]) / THINGS_VOXELS.format(int(entry["subject"])),
                        usecols=["voxel_id", "nc_testset"]).set_index("voxel_id")
    return table["nc_testset"].reindex(voxel_ids).to_numpy(np.float64)


def noise_ceiling_rows(sim: SimulateConfig, brain: PreparedTruth, prepared: Path, entry: dict) -> dict:
    """Per ROI: known NC (median, mean), the data's NC estimate and median r(signal, test split)."""
    # 1. Known NC from the model; the data's estimate from the same trials (formats.noise_ceiling,
    #    the estimator that wrote THINGS' nc_testset), on prepare's per-session z-scores.
    trials, repeats = repeated_test_trials(prepared)
    known = noise_ceiling(brain.amplitude, brain.signal[brain.test], sim.encoding.noise_sd, repeats)
    data = formats.noise_ceiling(trials)[0] if trials is not None else None
    with h5py.File(prepared, "r") as f:
        voxel_ids = np.asarray(f["norm/voxel_ids"], dtype=np.int64)
        averaged = {roi: np.asarray(f[f"splits/test/rois/{roi}"], dtype=np.float64) for roi in brain.columns}
    metadata = things_nc_testset(entry, voxel_ids) if entry["source"] == "things" else None
    # 2. Per ROI summaries.
    rois = {}
    for roi, cols in brain.columns.items():
        r = metrics.per_dimension_pearson(brain.signal[brain.test][:, cols], averaged[roi])  # NaN: constant
        rois[roi] = {"n_voxels": len(cols), "median": float(np.median(known[cols])), "mean": float(known[cols].mean()),
                     "data_mean": None if data is None else float(data[cols].mean()),
                     "nc_testset_mean": None if metadata is None else float(np.nanmean(metadata[cols])),
                     "signal_r_median": float(np.nanmedian(r))}
    return {"n_repeats": round(float(1 / np.mean(1.0 / repeats)), 6), "noise_sd": sim.encoding.noise_sd,
            "notes": {"median, mean": "known NC = 100 S / (S + N / n): S = variance of amplitude * signal over the "
                                        "test images, N = noise_sd^2, n = the test images' repeats (harmonic mean)",
                      "data_mean": "the data's estimate (formats.noise_ceiling) from the prepared test trials "
                                   "(per-session z-scores)",
                      "nc_testset_mean": "THINGS VoxelMetadata nc_testset (raw betas: session drift counts as noise)",
                      "signal_r_median": "median over voxels of r(noise-free signal, prepared test split)"},
            "rois": rois}


def oracle_entry(fit: FitConfig, target: str, name: str) -> DecoderConfig:
    """The fit entry the oracle mirrors for ``target``: a ridge decoder of that target (ConfigError if not)."""
    entry = decoder_config(fit, name)
    if target not in TARGETS or entry.kind != "ridge" or entry.target != target:
        raise ConfigError(f"known_truth.oracle.{target}: {name!r} is a {entry.kind} decoder of {entry.target}; "
                          f"expected a ridge decoder of {target} (targets {TARGETS})")
    return entry


def fit_oracle(brain: PreparedTruth, targets: Path, target: str, entry: DecoderConfig,
               std_floor: float) -> tuple[RidgeModel, np.ndarray, np.ndarray]:
    """Ridge CV on the training trials' noise-free responses (fit's train_ridge with X noise-free).

    Only training rows reach the fit: the same rows, folds (grouped by image) and alpha grid as the
    decoder ``entry``; targets standardised with training mean and std (floor ``std_floor``) as fit does.
    Returns the model and the target mean, std (K,) float32.
    """
    cols = np.concatenate([brain.columns[roi] for roi in entry.input_rois])
    x = brain.responses()[brain.train][:, cols]
    y = load_targets(targets, target, brain.train).reshape(len(brain.train), -1)
    mean = y.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = np.maximum(y.std(axis=0, dtype=np.float64), std_floor).astype(np.float32)
    settings = entry.ridge
    model = fit_ridge_cv(x, (y - mean) / std, list(settings.alphas), n_folds=settings.n_folds, groups=brain.train,
                         target_chunk=settings.target_chunk, progress=False)
    return model, mean, std


def oracle_scores(brain: PreparedTruth, targets: Path, target: str, entry: DecoderConfig, std_floor: float) -> dict:
    """The oracle's test metrics (decode.stage1_metrics against the test images' targets)."""
    model, mean, std = fit_oracle(brain, targets, target, entry, std_floor)
    cols = np.concatenate([brain.columns[roi] for roi in entry.input_rois])
    real = load_targets(targets, target, brain.test)
    pred = (model.predict(brain.responses()[brain.test][:, cols]) * std + mean).reshape(real.shape)
    return {"input_rois": list(entry.input_rois), "n_train": len(brain.train), "n_voxels": len(cols),
            "alpha_median": float(np.median(model.alpha_per_target)), **stage1_metrics(real, pred)}


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None  # no share of a non-positive oracle score


def shares(oracle: dict[str, dict], decode_dir: Path, decoders: tuple[str, ...]) -> dict[str, dict]:
    """Each decoder's test score over the oracle's of its target (from ``decode_dir/<decoder>.json``)."""
    out = {}
    for name in decoders:
        path = decode_dir / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"decoder results not found: {path} (run the decode stage first)")
        got = json.loads(path.read_text(encoding="utf-8"))
        if got.get("target") not in oracle:
            raise ValueError(f"{path}: target {got.get('target')!r} has no oracle "
                             f"(known_truth.oracle: {sorted(oracle)})")
        best = oracle[got["target"]]
        chance = got.get("identification_chance", IDENTIFICATION_CHANCE)
        out[name] = {"target": got["target"], "pearson_dim": _ratio(got["pearson_dim"], best["pearson_dim"]),
                     "identification": _ratio(got["identification"], best["identification"]),
                     "identification_above_chance": _ratio(got["identification"] - chance,
                                                           best["identification"] - chance),
                     "decoder_pearson_dim": got["pearson_dim"], "decoder_identification": got["identification"]}
    return out


def run(cfg: KnownTruthConfig, sim: SimulateConfig, fit: FitConfig, dataset: str) -> Path:
    """Known truth of ``dataset`` (a simulated subject's prepared file); writes and returns its JSON."""
    prepared = Path(cfg.prepared_dir) / f"{dataset}.h5"
    targets = Path(cfg.targets_dir) / f"{dataset}.h5"
    entries = {target: oracle_entry(fit, target, name) for target, name in cfg.oracle.items()}
    # 1. The truth: rebuilt from the simulate params, mapped onto the prepared layout.
    simulated, entry = simulated_dataset(sim, prepared)
    brain = on_prepared(simulate.simulated_truth(sim, simulated), prepared)
    # 2. Known noise ceilings.
    ceiling = noise_ceiling_rows(sim, brain, prepared, entry)
    # 3. The oracle per target, then each decoder's share of it.
    oracle = {}
    for target, decoder in entries.items():
        check_aligned(prepared, targets, target)
        oracle[target] = {"decoder": cfg.oracle[target], "ridge": config_to_dict(decoder.ridge),
                          **oracle_scores(brain, targets, target, decoder, fit.std_floor)}
    result = {"dataset": dataset, "simulated": simulated, "noise_ceiling": ceiling, "oracle": oracle,
              "shares": shares(oracle, Path(cfg.decode_dir) / dataset, cfg.decoders),
              "config": config_to_record(cfg)}
    out = Path(cfg.out_dir) / f"{dataset}.json"
    write_text_atomic(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True)
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_config(KnownTruthConfig, "known_truth", args.params)
        sim = load_config(SimulateConfig, "simulate", args.params)
        fit = load_config(FitConfig, "fit", args.params)
        return f"wrote {run(cfg, sim, fit, args.dataset)}"
    return run_stage(work)


if __name__ == "__main__":
    sys.exit(main())
