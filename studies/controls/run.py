"""The control study of the seed's claim "nonlinear decoders beat linear ones".

Simulated subjects across the encoding model's nonlinearity and the number of training trials,
each decoded by ridge and by the nonlinear decoders with the main pipeline's own stage modules
(simulate -> prepare -> targets -> fit -> decode), under its leak-free protocol and its numeric
pins. A negative control (a near-linear brain: no decoder should beat ridge) and a positive one
(a strongly nonlinear brain with many trials: a nonlinear decoder should win). A second family,
the latent-Gaussian subject (``latent.py``), is the world in which ridge is provably optimal for a
linear brain; it runs the same decoders through ``fit``'s own training functions.

    python studies/controls/run.py [--params studies/controls/params.yaml] [--only CONDITION ...]

Each condition's params are the main params.yaml with the study's overrides, written to
``<work_dir>/<condition>/params.yaml`` (a latent condition's inputs to
``<work_dir>/latent/<condition>/inputs.json``); a stage whose outputs exist for the same params is
not re-run, so an interrupted study resumes. The result (``<results_dir>/``): ``controls.json``
(every number), ``controls.md`` (the table) and ``controls.png`` (the plot).

Scores (``summarise``): per condition and decoder the test split's r/dim (the decode stage's
``pearson_dim``) and the per-image r (Pearson r between an image's predicted and true z over its
dimensions) with a bootstrap CI over test images; per nonlinear decoder the paired per-image
difference to the baseline (ridge) with its CI. A decoder "wins" when that CI lies above 0.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.config import config_to_dict, from_dict, load_config, load_params, run_stage
from brainldm.train.data.prepare import PrepareConfig
from brainldm.train.data.splits import load_targets, split_image_index
from brainldm.train.decoding.fit_config import FitConfig
from brainldm.train.evaluation.metrics import per_sample_pearson, summarise as summarise_scores

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # latent.py, beside this script (studies/ is not an installed package)
import latent  # noqa: E402
from figures import plot, report  # noqa: E402

ROOT = HERE.parents[1]


class StudyError(RuntimeError):
    """A stage of the study failed (the message names the condition and the stage)."""


@dataclass(frozen=True)
class Condition:
    """One simulated subject: the encoding's nonlinearity gain and the design's size."""

    nonlinearity_gain: float
    n_unique_images: int
    n_sessions: int


@dataclass(frozen=True)
class LatentFamily:
    """The latent-Gaussian conditions: each is ``subject`` with the condition's overrides."""

    decoders: tuple[str, ...]
    subject: dict[str, Any]
    conditions: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class StudyConfig:
    """studies/controls/params.yaml."""

    conditions: dict[str, Condition]
    latent: LatentFamily
    decoders: tuple[str, ...]
    baseline: str
    base_params: str = "params.yaml"
    work_dir: str = "studies/controls/work"
    results_dir: str = "studies/controls/results"
    dataset: str = "sim-nsd"
    target_latent: str = "mean"
    n_shared_images: int = 200
    n_boot: int = 2000
    ci_level: float = 0.95
    boot_seed: int = 0


def condition_params(base: dict, cfg: StudyConfig, name: str, condition: Condition) -> dict:
    """The main params with one condition's overrides; every path under ``<work_dir>/<name>``."""
    params = copy.deepcopy(base)
    work = f"{cfg.work_dir}/{name}"
    raw = f"{work}/raw/{cfg.dataset}"
    sim = params["simulate"]
    sim["datasets"] = [cfg.dataset]
    sim["encoding"]["nonlinearity_gain"] = condition.nonlinearity_gain
    sim["nsd"].update(root=raw, n_unique_images=condition.n_unique_images, n_sessions=condition.n_sessions,
                      n_shared_images=cfg.n_shared_images)
    params["prepare"]["datasets"] = {cfg.dataset: {**params["prepare"]["datasets"][cfg.dataset], "root": raw}}
    params["prepare"]["output_dir"] = f"{work}/prepared"
    params["targets"].update(prepared_dir=f"{work}/prepared", targets_dir=f"{work}/targets", latent=cfg.target_latent)
    folders = dict(prepared_dir=f"{work}/prepared", targets_dir=f"{work}/targets", models_dir=f"{work}/models")
    params["fit"].update(folders, results_dir=f"{work}/fit")
    params["fit"]["decoders"] = {d: params["fit"]["decoders"][d] for d in cfg.decoders}
    params["decode"].update(folders, results_dir=f"{work}/decode")
    params["pipeline"].update(datasets=[cfg.dataset], decoders=list(cfg.decoders))
    return params


def pinned_env() -> list[str]:
    """The numeric pins of the main pipeline (dvc.yaml's ``pinned``, read from there)."""
    variables = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"]
    return next(v["pinned"] for v in variables if "pinned" in v).split()


def stage_commands(cfg: StudyConfig, params_file: Path) -> list[tuple[str, list[str]]]:
    """(label, argv) of every stage of one condition, in pipeline order."""
    p, d = ["--params", str(params_file)], ["--dataset", cfg.dataset]
    module = "brainldm.train."
    steps = [("simulate", [module + "simulation.simulate", *p]), ("prepare", [module + "data.prepare", *p, *d]),
             ("targets", [module + "decoding.targets", *p, *d])]
    steps += [(f"fit {k}", [module + "decoding.fit", *p, *d, "--decoder", k]) for k in cfg.decoders]
    steps += [(f"decode {k}", [module + "decoding.decode", *p, *d, "--decoder", k]) for k in cfg.decoders]
    return [(label, [*pinned_env(), sys.executable, "-m", *argv]) for label, argv in steps]


def _timed_run(argv: list[str], what: str) -> float:
    """Run one pinned subprocess from the repository root; its wall seconds, or StudyError naming
    ``what`` with the last line the subprocess printed."""
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise StudyError(f"{what} failed: {tail[0]}")
    return round(time.perf_counter() - start, 1)


def run_condition(cfg: StudyConfig, base: dict, name: str, condition: Condition) -> dict[str, float]:
    """Run (or resume) one condition; returns each stage's wall seconds (0 when it was done before)."""
    work = ROOT / cfg.work_dir / name
    work.mkdir(parents=True, exist_ok=True)
    params_text = yaml.safe_dump(condition_params(base, cfg, name, condition), sort_keys=True)
    params_file = work / "params.yaml"
    write_text_atomic(params_file, params_text)
    done = _done(work, params_text)
    for label, argv in stage_commands(cfg, params_file.relative_to(ROOT)):
        if label in done["seconds"]:
            continue
        print(f"[{name}] {label}", flush=True)
        done["seconds"][label] = _timed_run(argv, f"condition {name}, stage {label}")
        write_text_atomic(work / "done.json", json.dumps(done, indent=1))
    return done["seconds"]


def _done(work: Path, params_text: str) -> dict:
    """The stages of a condition already run with exactly ``params_text`` ({} of seconds otherwise)."""
    digest = hashlib.sha256(params_text.encode()).hexdigest()
    done_file = work / "done.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    return done if done.get("params_sha256") == digest else {"params_sha256": digest, "seconds": {}}


def is_complete(cfg: StudyConfig, base: dict, name: str) -> bool:
    """Whether every stage of condition ``name`` ran with its current params."""
    params_text = yaml.safe_dump(condition_params(base, cfg, name, cfg.conditions[name]), sort_keys=True)
    done = _done(ROOT / cfg.work_dir / name, params_text)
    return {label for label, _ in stage_commands(cfg, Path("params.yaml"))} <= set(done["seconds"])


def latent_inputs(cfg: StudyConfig, name: str) -> str:
    """The inputs.json text of latent condition ``name``: its subject, the main params' entries of
    the family's decoders and ``prepare.graph``, and the fit threads (latent.run_inputs)."""
    params = ROOT / cfg.base_params
    fit, prepare = load_config(FitConfig, "fit", params), load_config(PrepareConfig, "prepare", params)
    subject = latent.subject_from(cfg.latent.conditions[name], cfg.latent.subject, where=f"latent.conditions.{name}")
    inputs = {"subject": dataclasses.asdict(subject), "graph": config_to_dict(prepare.graph), "threads": fit.threads,
              "decoders": {d: config_to_dict(fit.decoders[d]) for d in cfg.latent.decoders}}
    return json.dumps(inputs, indent=1, sort_keys=True) + "\n"


def run_latent(cfg: StudyConfig, name: str) -> float:
    """Run (or resume) latent condition ``name`` under the pins; its wall seconds (0 when done before)."""
    work = ROOT / cfg.work_dir / "latent" / name
    work.mkdir(parents=True, exist_ok=True)
    inputs = latent_inputs(cfg, name)
    write_text_atomic(work / "inputs.json", inputs)
    done = _done(work, inputs)
    if "fit and score" in done["seconds"]:
        return 0.0
    print(f"[{name}] fit and score {', '.join(cfg.latent.decoders)}", flush=True)
    argv = [*pinned_env(), sys.executable, str(HERE / "latent.py"), "--inputs", str(work / "inputs.json"),
            "--out", str(work / "scores.json")]
    done["seconds"]["fit and score"] = _timed_run(argv, f"latent condition {name}")
    write_text_atomic(work / "done.json", json.dumps(done, indent=1))
    return done["seconds"]["fit and score"]


def latent_complete(cfg: StudyConfig, name: str) -> bool:
    """Whether latent condition ``name`` ran with its current inputs."""
    return "fit and score" in _done(ROOT / cfg.work_dir / "latent" / name, latent_inputs(cfg, name))["seconds"]


def load_study(path: str | Path) -> StudyConfig:
    """The study config; an unknown key is an error naming it."""
    cfg = from_dict(StudyConfig, load_params(path), where=str(path), strict=True)
    for family, decoders in (("decoders", cfg.decoders), ("latent.decoders", cfg.latent.decoders)):
        if cfg.baseline not in decoders:
            raise ValueError(f"baseline {cfg.baseline!r} is not among {family} {list(decoders)}")
    shared = sorted(set(cfg.conditions) & set(cfg.latent.conditions))
    if shared:
        raise ValueError(f"condition name(s) {shared} used in both conditions and latent.conditions")
    for name, settings in cfg.latent.conditions.items():
        latent.subject_from(settings, cfg.latent.subject, where=f"latent.conditions.{name}")
    return cfg


def per_image_r(work: Path, dataset: str, decoder: str) -> tuple[np.ndarray, float]:
    """(per-image r (n_test,) float64, r/dim) of one fitted decoder of one condition."""
    metrics = json.loads((work / "decode" / dataset / f"{decoder}.json").read_text())
    with h5py.File(work / "decode" / dataset / f"{decoder}.h5", "r") as f:
        pred, image_index = f["pred"][:], f["image_index"][:]
    real = load_targets(work / "targets" / f"{dataset}.h5", metrics["target"], image_index)
    r = per_sample_pearson(real.reshape(len(real), -1), pred.reshape(len(pred), -1))
    return r.astype(np.float64), float(metrics["pearson_dim"])


def _rows(cfg: StudyConfig, scores: dict[str, tuple[np.ndarray, float]]) -> dict:
    """decoder -> r/dim, the per-image r's summary and (not the baseline) the paired difference."""
    base, rows = scores[cfg.baseline][0], {}
    for decoder, (r, r_dim) in scores.items():
        row = {"r_per_dim": r_dim, "per_image_r": dataclasses.asdict(
            summarise_scores(r, cfg.n_boot, cfg.ci_level, cfg.boot_seed))}
        if decoder != cfg.baseline:
            diff = summarise_scores(r - base, cfg.n_boot, cfg.ci_level, cfg.boot_seed)
            row["minus_baseline"] = dataclasses.asdict(diff)
            row["beats_baseline"] = diff.ci_low > 0
            row["loses_to_baseline"] = diff.ci_high < 0
        rows[decoder] = row
    return rows


def summarise(cfg: StudyConfig, root: Path, conditions: list[str], latent_conditions: tuple[str, ...] = ()) -> dict:
    """Every number of the study: condition -> decoder -> scores, and the paired differences;
    the latent family's under ``latent``."""
    out = {"decoders": list(cfg.decoders), "baseline": cfg.baseline, "ci_level": cfg.ci_level,
           "dataset": cfg.dataset, "target_latent": cfg.target_latent, "conditions": {},
           "latent": {"decoders": list(cfg.latent.decoders), "conditions": {}}}
    for name in conditions:
        work = root / cfg.work_dir / name
        done = json.loads((work / "done.json").read_text())
        scores = {d: per_image_r(work, cfg.dataset, d) for d in cfg.decoders}
        out["conditions"][name] = {"settings": dataclasses.asdict(cfg.conditions[name]), "seconds": done["seconds"],
                                   "n_train_trials": _train_trials(work, cfg.dataset), "decoders": _rows(cfg, scores)}
    for name in latent_conditions:
        work = root / cfg.work_dir / "latent" / name
        found = json.loads((work / "scores.json").read_text())
        scores = {d: (np.asarray(v["per_image_r"], dtype=np.float64), v["r_per_dim"])
                  for d, v in found["decoders"].items()}
        out["latent"]["conditions"][name] = {
            "settings": json.loads((work / "inputs.json").read_text())["subject"],
            "seconds": {f"fit {d}": v["seconds"] for d, v in found["decoders"].items()},
            "n_train_trials": found["n_train_trials"], "decoders": _rows(cfg, scores)}
    return out


def _train_trials(work: Path, dataset: str) -> int:
    return int(len(split_image_index(work / "prepared" / f"{dataset}.h5", "train")))


def carry_over(family: dict, previous: dict, settings: dict[str, dict]) -> None:
    """Keep ``previous``'s entry (the same family of the last controls.json) of each configured
    condition not summarised here whose settings and decoders are unchanged: ``--only`` on a fresh
    clone (no work folders) adds to the committed result instead of replacing it. In ``settings``'
    order."""
    found = family["conditions"]
    for name, wanted in settings.items():
        old = previous.get("conditions", {}).get(name)
        if name not in found and old and old["settings"] == wanted and set(old["decoders"]) == set(family["decoders"]):
            found[name] = old
    family["conditions"] = {name: found[name] for name in settings if name in found}


def write_outputs(result: dict, results_dir: Path) -> None:
    """controls.json, controls.md and controls.png in ``results_dir``, each atomically."""
    results_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results_dir / "controls.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_text_atomic(results_dir / "controls.md", report(result))
    plot(result, results_dir / "controls.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="studies/controls/params.yaml")
    parser.add_argument("--only", nargs="+", metavar="CONDITION", help="run only these conditions")
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_study(ROOT / args.params)
        base = yaml.safe_load((ROOT / cfg.base_params).read_text())
        names = args.only or [*cfg.conditions, *cfg.latent.conditions]
        unknown = sorted(set(names) - set(cfg.conditions) - set(cfg.latent.conditions))
        if unknown:
            raise ValueError(f"unknown conditions {unknown}; configured: "
                             f"{sorted(cfg.conditions)} and latent {sorted(cfg.latent.conditions)}")
        for name in names:
            if name in cfg.conditions:
                run_condition(cfg, base, name, cfg.conditions[name])
            else:
                run_latent(cfg, name)
        finished = [n for n in cfg.conditions if is_complete(cfg, base, n)]
        latent_finished = tuple(n for n in cfg.latent.conditions if latent_complete(cfg, n))
        result = summarise(cfg, ROOT, finished, latent_finished)
        last = ROOT / cfg.results_dir / "controls.json"
        previous = json.loads(last.read_text()) if last.is_file() else {"latent": {}}
        carry_over(result, previous, {n: dataclasses.asdict(c) for n, c in cfg.conditions.items()})
        carry_over(result["latent"], previous.get("latent", {}), {n: dataclasses.asdict(latent.subject_from(
            s, cfg.latent.subject)) for n, s in cfg.latent.conditions.items()})
        write_outputs(result, ROOT / cfg.results_dir)
        return f"wrote {cfg.results_dir}/controls.md, controls.json, controls.png"
    return run_stage(work, errors=(StudyError,))


if __name__ == "__main__":
    sys.exit(main())
