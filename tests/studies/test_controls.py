"""studies/controls/run.py: each condition's params, the resume bookkeeping, the scores and the table."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from brainldm.train.config import ConfigError, load_config
from brainldm.train.data.prepare import PrepareConfig
from brainldm.train.decoding.decode import DecodeConfig
from brainldm.train.decoding.fit_config import FitConfig
from brainldm.train.decoding.targets import TargetsConfig
from brainldm.train.simulation.simulate import SimulateConfig

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("controls_run", ROOT / "studies" / "controls" / "run.py")
C = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = C  # dataclasses look their module up while the class is built
SPEC.loader.exec_module(C)

STAGE_CONFIGS = {"simulate": SimulateConfig, "prepare": PrepareConfig, "targets": TargetsConfig, "fit": FitConfig,
                 "decode": DecodeConfig}


@pytest.fixture(scope="module")
def study():
    return C.load_study(ROOT / "studies" / "controls" / "params.yaml")


def test_each_condition_writes_only_under_its_folder_and_loads_in_every_stage(study, tmp_path):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    name = next(iter(study.conditions))
    params = C.condition_params(base, study, name, study.conditions[name])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    configs = {section: load_config(cls, section, path) for section, cls in STAGE_CONFIGS.items()}
    work = f"{study.work_dir}/{name}/"
    folders = {f"{section}.{f.name}": getattr(cfg, f.name) for section, cfg in configs.items()
               for f in dataclasses.fields(cfg) if f.name.endswith("_dir")}
    folders.update({"simulate.nsd.root": configs["simulate"].nsd.root,
                    "prepare.datasets.root": configs["prepare"].datasets[study.dataset].root})
    assert len(folders) >= 10 and {k: v for k, v in folders.items() if not v.startswith(work)} == {}
    assert configs["simulate"].encoding.nonlinearity_gain == study.conditions[name].nonlinearity_gain
    assert configs["simulate"].nsd.n_unique_images == study.conditions[name].n_unique_images
    assert configs["targets"].latent == study.target_latent
    assert sorted(configs["fit"].decoders) == sorted(study.decoders)
    assert base["simulate"]["nsd"]["root"] == "data/raw/sim-nsd"  # the main params are left as they were


def test_the_conditions_span_a_near_linear_and_a_strongly_nonlinear_brain(study):
    gains = {c.nonlinearity_gain for c in study.conditions.values()}
    sizes = {c.n_unique_images for c in study.conditions.values()}
    assert min(gains) <= 0.1 and max(gains) >= 6 and len(sizes) >= 2


def test_unknown_or_missing_study_keys_are_errors(tmp_path):
    raw = yaml.safe_load((ROOT / "studies" / "controls" / "params.yaml").read_text())
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**raw, "epochs": 3}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochs'\]"):
        C.load_study(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**raw, "baseline": "ridge-c"}))
    with pytest.raises(ValueError, match="baseline 'ridge-c' is not among decoders"):
        C.load_study(tmp_path / "b.yaml")


def test_a_stage_run_with_other_params_is_run_again(tmp_path):
    done = {"params_sha256": C._done(tmp_path, "a: 1\n")["params_sha256"], "seconds": {"simulate": 3.0}}
    (tmp_path / "done.json").write_text(json.dumps(done))
    assert C._done(tmp_path, "a: 1\n")["seconds"] == {"simulate": 3.0}
    assert C._done(tmp_path, "a: 2\n")["seconds"] == {}


def _fake_condition(work: Path, dataset: str, preds: dict[str, np.ndarray], real: np.ndarray) -> None:
    (work / "decode" / dataset).mkdir(parents=True)
    (work / "targets").mkdir()
    (work / "prepared").mkdir()
    n = len(real)
    with h5py.File(work / "targets" / f"{dataset}.h5", "w") as f:
        f["z"] = real
    with h5py.File(work / "prepared" / f"{dataset}.h5", "w") as f:
        f["splits/train/image_index"] = np.arange(7)
    for name, pred in preds.items():
        with h5py.File(work / "decode" / dataset / f"{name}.h5", "w") as f:
            f["pred"], f["image_index"] = pred, np.arange(n)
        (work / "decode" / dataset / f"{name}.json").write_text(json.dumps({"target": "z", "pearson_dim": 0.5}))


def test_scores_find_the_better_decoder_and_the_table_says_so(study, tmp_path):
    rng = np.random.default_rng(0)
    real = rng.standard_normal((40, 2, 3, 3)).astype(np.float32)
    good = real + 0.3 * rng.standard_normal(real.shape).astype(np.float32)
    bad = real + 3.0 * rng.standard_normal(real.shape).astype(np.float32)
    cfg = dataclasses.replace(study, decoders=("ridge-z", "cnn-z", "vae-z"), baseline="ridge-z",
                              work_dir="w", conditions={"g6": C.Condition(6.0, 10, 3)})
    work = tmp_path / "w" / "g6"
    _fake_condition(work, cfg.dataset, {"ridge-z": real + 1.0 * rng.standard_normal(real.shape).astype(np.float32),
                                        "cnn-z": good, "vae-z": bad}, real)
    (work / "done.json").write_text(json.dumps({"params_sha256": "x", "seconds": {"simulate": 1.0}}))
    result = C.summarise(cfg, tmp_path, ["g6"])
    rows = result["conditions"]["g6"]["decoders"]
    assert rows["cnn-z"]["beats_baseline"] and not rows["cnn-z"]["loses_to_baseline"]
    assert rows["vae-z"]["loses_to_baseline"] and not rows["vae-z"]["beats_baseline"]
    assert result["conditions"]["g6"]["n_train_trials"] == 7
    expected = np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(real, good)])
    assert rows["cnn-z"]["per_image_r"]["mean"] == pytest.approx(expected, abs=1e-6)
    row = next(line for line in C.report(result).splitlines() if line.startswith("| g6 |"))
    assert "**wins**" in row.split("|")[-3] and "loses" in row.split("|")[-2]
    C.write_outputs(result, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"controls.json", "controls.md", "controls.png"}


def test_a_latent_condition_is_the_family_subject_with_its_overrides_and_the_main_decoders(study):
    name = next(iter(study.latent.conditions))
    inputs = json.loads(C.latent_inputs(study, name))
    assert inputs["subject"] == {**study.latent.subject, **study.latent.conditions[name],
                                 "nonlinearity_gain": float(study.latent.conditions[name]["nonlinearity_gain"])}
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sorted(inputs["decoders"]) == sorted(study.latent.decoders)
    assert inputs["decoders"]["vae-z"]["vae"] == base["fit"]["decoders"]["vae-z"]["vae"]
    assert inputs["graph"]["nodes"] == base["prepare"]["graph"]["nodes"]
    assert inputs["threads"] == base["fit"]["threads"]


def test_the_latent_family_spans_linear_and_nonlinear_brains_and_harder_noise(study):
    subjects = [C.latent.subject_from(s, study.latent.subject) for s in study.latent.conditions.values()]
    assert min(s.nonlinearity_gain for s in subjects) <= 0.1 and max(s.nonlinearity_gain for s in subjects) >= 6
    assert max(s.n_train_images * s.n_repeats for s in subjects) >= 24000  # NSD's ~25k trials
    assert any(s.noise_corr > 0 and s.low_snr_fraction > 0 for s in subjects)


def test_bad_latent_settings_are_errors_before_anything_runs(tmp_path):
    raw = yaml.safe_load((ROOT / "studies" / "controls" / "params.yaml").read_text())
    bad = copy.deepcopy(raw)
    bad["latent"]["conditions"]["x"] = {"nonlinearity_gain": 1.0, "n_train_images": 10, "gain": 2}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"latent.conditions.x: unknown key\(s\) \['gain'\]"):
        C.load_study(tmp_path / "a.yaml")
    clash = copy.deepcopy(raw)
    clash["latent"]["conditions"]["g6-n3k"] = {"nonlinearity_gain": 6.0, "n_train_images": 10}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(clash))
    with pytest.raises(ValueError, match=r"\['g6-n3k'\] used in both"):
        C.load_study(tmp_path / "b.yaml")


def _latent_scores(work: Path, subject: dict, per_image: dict[str, list[float]]) -> None:
    work.mkdir(parents=True)
    (work / "inputs.json").write_text(json.dumps({"subject": subject}))
    (work / "scores.json").write_text(json.dumps({"n_train_trials": 90, "decoders": {
        d: {"per_image_r": r, "r_per_dim": float(np.mean(r)), "seconds": 1.0} for d, r in per_image.items()}}))


def test_latent_scores_are_summarised_beside_the_scene_ones_and_kept_when_not_rerun(study, tmp_path):
    rng = np.random.default_rng(1)
    ridge = 0.5 + 0.1 * rng.standard_normal(50)
    subject = {**study.latent.subject, "nonlinearity_gain": 6.0, "n_train_images": 30}
    family = dataclasses.replace(study.latent, decoders=("ridge-z", "vae-z"),
                                 conditions={"lat": {"nonlinearity_gain": 6.0, "n_train_images": 30}})
    cfg = dataclasses.replace(study, work_dir="w", latent=family)
    _latent_scores(tmp_path / "w" / "latent" / "lat", subject,
                   {"ridge-z": ridge.tolist(), "vae-z": (ridge + 0.05 + 0.01 * rng.standard_normal(50)).tolist()})
    result = C.summarise(cfg, tmp_path, [], ("lat",))
    row = result["latent"]["conditions"]["lat"]["decoders"]["vae-z"]
    assert row["beats_baseline"] and row["minus_baseline"]["mean"] == pytest.approx(0.05, abs=0.005)
    assert "| lat | 6 | 1 | 0 | 0 | 90 |" in C.report(result)
    # a later run that did not redo "lat" keeps its entry while its settings are unchanged ...
    later = C.summarise(cfg, tmp_path / "elsewhere", [], ())
    C.carry_over(later["latent"], result["latent"], {"lat": subject})
    assert later["latent"]["conditions"]["lat"] == result["latent"]["conditions"]["lat"]
    # ... and drops it once they changed
    fresh = C.summarise(cfg, tmp_path / "elsewhere", [], ())
    C.carry_over(fresh["latent"], result["latent"], {"lat": {**subject, "noise_sd": 3.0}})
    assert fresh["latent"]["conditions"] == {}
