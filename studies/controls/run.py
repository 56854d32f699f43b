"""The control study of the seed's claim "nonlinear decoders beat linear ones".

Simulated subjects across the encoding model's nonlinearity and the number of training trials,
each decoded by ridge and by the nonlinear decoders with the main pipeline's own stage modules
(simulate -> prepare -> targets -> fit -> decode), under its leak-free protocol and its numeric
pins. A negative control (a near-linear brain: no decoder should beat ridge) and a positive one
(a strongly nonlinear brain with many trials: a nonlinear decoder should win).

    python studies/controls/run.py [--params studies/controls/params.yaml] [--only CONDITION ...]

Each condition's params are the main params.yaml with the study's overrides, written to
``<work_dir>/<condition>/params.yaml``; a stage whose outputs exist for the same params is not
re-run, so an interrupted study resumes. The result (``<results_dir>/``): ``controls.json``
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

import h5py
import numpy as np
import yaml

from brainldm.runtime.atomic import atomic_path, write_text_atomic
from brainldm.train.config import from_dict, load_params, run_stage
from brainldm.train.data.splits import load_targets, split_image_index
from brainldm.train.evaluation.metrics import per_sample_pearson, summarise as summarise_scores

ROOT = Path(__file__).resolve().parents[2]


class StudyError(RuntimeError):
    """A stage of the study failed (the message names the condition and the stage)."""


@dataclass(frozen=True)
class Condition:
    """One simulated subject: the encoding's nonlinearity gain and the design's size."""

    nonlinearity_gain: float
    n_unique_images: int
    n_sessions: int


@dataclass(frozen=True)
class StudyConfig:
    """studies/controls/params.yaml."""

    conditions: dict[str, Condition]
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
        start = time.perf_counter()
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise StudyError(f"condition {name}, stage {label} failed: {tail[0]}")
        done["seconds"][label] = round(time.perf_counter() - start, 1)
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


def load_study(path: str | Path) -> StudyConfig:
    """The study config; an unknown key is an error naming it."""
    cfg = from_dict(StudyConfig, load_params(path), where=str(path), strict=True)
    if cfg.baseline not in cfg.decoders:
        raise ValueError(f"baseline {cfg.baseline!r} is not among decoders {list(cfg.decoders)}")
    return cfg


def per_image_r(work: Path, dataset: str, decoder: str) -> tuple[np.ndarray, float]:
    """(per-image r (n_test,) float64, r/dim) of one fitted decoder of one condition."""
    metrics = json.loads((work / "decode" / dataset / f"{decoder}.json").read_text())
    with h5py.File(work / "decode" / dataset / f"{decoder}.h5", "r") as f:
        pred, image_index = f["pred"][:], f["image_index"][:]
    real = load_targets(work / "targets" / f"{dataset}.h5", metrics["target"], image_index)
    r = per_sample_pearson(real.reshape(len(real), -1), pred.reshape(len(pred), -1))
    return r.astype(np.float64), float(metrics["pearson_dim"])


def summarise(cfg, root: Path, conditions: list[str]) -> dict:
    """Every number of the study: condition -> decoder -> scores, and the paired differences."""
    out = {"decoders": list(cfg.decoders), "baseline": cfg.baseline, "ci_level": cfg.ci_level,
           "dataset": cfg.dataset, "target_latent": cfg.target_latent, "conditions": {}}
    for name in conditions:
        work = root / cfg.work_dir / name
        done = json.loads((work / "done.json").read_text())
        scores = {d: per_image_r(work, cfg.dataset, d) for d in cfg.decoders}
        base = scores[cfg.baseline][0]
        entry = {"settings": dataclasses.asdict(cfg.conditions[name]), "seconds": done["seconds"],
                 "n_train_trials": _train_trials(work, cfg.dataset), "decoders": {}}
        for decoder, (r, r_dim) in scores.items():
            row = {"r_per_dim": r_dim, "per_image_r": dataclasses.asdict(
                summarise_scores(r, cfg.n_boot, cfg.ci_level, cfg.boot_seed))}
            if decoder != cfg.baseline:
                diff = summarise_scores(r - base, cfg.n_boot, cfg.ci_level, cfg.boot_seed)
                row["minus_baseline"] = dataclasses.asdict(diff)
                row["beats_baseline"] = diff.ci_low > 0
                row["loses_to_baseline"] = diff.ci_high < 0
            entry["decoders"][decoder] = row
        out["conditions"][name] = entry
    return out


def _train_trials(work: Path, dataset: str) -> int:
    return int(len(split_image_index(work / "prepared" / f"{dataset}.h5", "train")))


def table(result: dict) -> str:
    """Markdown: one row per condition, per decoder r/dim and the paired difference to the baseline."""
    others = [d for d in result["decoders"] if d != result["baseline"]]
    head = ["condition", "gain", "train trials", f"{result['baseline']} r/dim"]
    head += [f"{d} r/dim" for d in others] + [f"{d} − {result['baseline']} (per-image r, CI)" for d in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in result["conditions"].items():
        rows = entry["decoders"]
        cells = [name, f"{entry['settings']['nonlinearity_gain']:g}", f"{entry['n_train_trials']:,}",
                 f"{rows[result['baseline']]['r_per_dim']:.3f}"]
        cells += [f"{rows[d]['r_per_dim']:.3f}" for d in others]
        for d in others:
            diff = rows[d]["minus_baseline"]
            mark = " **wins**" if rows[d]["beats_baseline"] else (" loses" if rows[d]["loses_to_baseline"] else "")
            cells.append(f"{diff['mean']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Per-image r minus the baseline's, with CIs, against the nonlinearity gain; one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({e["n_train_trials"] for e in result["conditions"].values()})
    others = [d for d in result["decoders"] if d != result["baseline"]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        entries = sorted((e for e in result["conditions"].values() if e["n_train_trials"] == size),
                         key=lambda e: e["settings"]["nonlinearity_gain"])
        gains = [e["settings"]["nonlinearity_gain"] for e in entries]
        for k, d in enumerate(others):
            diffs = [e["decoders"][d]["minus_baseline"] for e in entries]
            mean = np.array([x["mean"] for x in diffs])
            err = np.array([[x["mean"] - x["ci_low"] for x in diffs], [x["ci_high"] - x["mean"] for x in diffs]])
            ax.errorbar(np.array(gains) * (1 + 0.03 * (k - 1)), mean, yerr=err, marker="o", capsize=3, label=d)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("encoding nonlinearity gain")
        ax.set_title(f"{size:,} training trials")
    axes[0][0].set_ylabel(f"per-image r − {result['baseline']} ({result['ci_level']:.0%} CI)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_outputs(result: dict, results_dir: Path) -> None:
    """controls.json, controls.md and controls.png in ``results_dir``, each atomically."""
    results_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results_dir / "controls.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_text_atomic(results_dir / "controls.md", table(result))
    plot(result, results_dir / "controls.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="studies/controls/params.yaml")
    parser.add_argument("--only", nargs="+", metavar="CONDITION", help="run only these conditions")
    args = parser.parse_args(argv)

    def work() -> str:
        cfg = load_study(ROOT / args.params)
        base = yaml.safe_load((ROOT / cfg.base_params).read_text())
        names = args.only or list(cfg.conditions)
        unknown = sorted(set(names) - set(cfg.conditions))
        if unknown:
            raise ValueError(f"unknown conditions {unknown}; configured: {sorted(cfg.conditions)}")
        for name in names:
            run_condition(cfg, base, name, cfg.conditions[name])
        finished = [n for n in cfg.conditions if is_complete(cfg, base, n)]
        write_outputs(summarise(cfg, ROOT, finished), ROOT / cfg.results_dir)
        return f"wrote {cfg.results_dir}/controls.md, controls.json, controls.png"
    return run_stage(work, errors=(StudyError,))


if __name__ == "__main__":
    sys.exit(main())
