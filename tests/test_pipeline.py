"""End to end: the real dvc.yaml, every stage, real code, on a tiny configuration.

A scratch git + DVC repository gets this repository's dvc.yaml and a params.yaml made of
the real one with tiny sizes laid over it; tiny raw data is simulated and `dvc add`-ed;
`dvc repro` must then run every stage, leave `dvc status` clean, do nothing when run
again, and re-run only the dependent stages when one param changes.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_ROIS_NSD = {"V1": 40, "V2": 35, "V3": 30, "hV4": 20, "mid": 25, "high": 40}
TINY_ROIS_THINGS = {"V1": 30, "V2": 25, "V3": 20, "hV4": 15, "LO1": 8, "VO1": 8, "FFA": 8, "PPA": 6, "LOC": 8}
FAST_OPTIM = {"batch_size": 16, "max_epochs": 2, "patience": 1}
TINY = {
    "pipeline": {"decoders": ["ridge-z", "ridge-c", "gcn-z", "cnn-c"]},
    "simulate": {
        "seed": 3, "image_size": 32, "n_captions": 2, "encoding": {"feature_grid": 16},
        "nsd": {"n_sessions": 3, "runs_per_session": 2, "n_unique_images": 30, "n_shared_images": 6,
                "n_extra_images": 8, "grid": [10, 12, 10], "roi_voxels": TINY_ROIS_NSD},
        "things": {"n_train_images": 40, "n_test_images": 6, "n_sessions": 3, "runs_per_session": 2,
                   "grid": [10, 12, 10], "roi_voxels": TINY_ROIS_THINGS},
    },
    "prepare": {"datasets": {"sim-things": {"image_size": 32, "rois": {
        "higher": {"columns": ["lFFA", "rFFA", "VO1", "lPPA", "rPPA", "lLOC", "rLOC"]}}}}},
    "train_ldm": {"n_train": 48, "image_size": 32, "n_captions": 2,
                  "vae": {"steps": 3, "batch_size": 8}, "unet": {"steps": 3, "batch_size": 8},
                  "eval": {"n_images": 4, "steps": 5, "batch_size": 4}},
    "targets": {"resolution": 32, "n_tokens": 15, "batch_size": 16},
    "attribute_classifier": {"image_size": 32, "n_train": 64, "n_val": 32, "epochs": 1, "batch_size": 32},
    "fit": {"decoders": {"gcn-z": {"optim": FAST_OPTIM}, "cnn-c": {"optim": FAST_OPTIM}}},
    "reconstruct": {"samples": 2, "steps": 5, "batch_size": 12},
    "evaluate": {"n_boot": 20, "grid_items": 3, "batch_size": 16},
    "parity": {"items": 2, "samples": 1, "batch_size": 2},
    "report": {"decoders": ["ridge-z", "ridge-c", "gcn-z", "cnn-c"]},
    "known_truth": {"decoders": ["ridge-z", "ridge-c", "gcn-z", "cnn-c"]},
}


def deep_update(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it, recursively (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "roi_voxels":
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _run(args: list[str], cwd: Path, check: bool = True) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done.stdout + done.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The stage modules are the installed package's; dvc.yaml lists them as deps by path.
    for package in ("train", "export", "runtime"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    # the raw data as the (pinned) simulate stage regenerates it when it verifies the data
    pinned = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["pinned"].split()
    _run([*pinned, sys.executable, "-m", "brainldm.train.simulation.simulate"], repo)
    _run([sys.executable, "-m", "dvc", "add", "-q", "data/raw"], repo)
    # The tiny LDM, trained as scripts/retrain_ldm.sh does (its stage is frozen: dvc repro never runs it).
    _run([sys.executable, "-m", "brainldm.train.ldm.train_ldm"], repo)
    _run([sys.executable, "-m", "dvc", "commit", "--force", "-q", "train_ldm"], repo)
    return repo


@pytest.mark.slow
def test_every_stage_runs_and_a_second_repro_does_nothing(tiny_repo):
    first = _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    pipeline = yaml.safe_load((tiny_repo / "params.yaml").read_text())["pipeline"]
    assert "ceiling" in pipeline["reconstructions"] and "ceiling" not in pipeline["pairs"]
    expected = {"simulate", "attribute_classifier", "report"}
    for dataset in ("sim-nsd", "sim-things"):
        expected |= {f"prepare@{dataset}", f"targets@{dataset}", f"evaluate@{dataset}", f"known_truth@{dataset}"}
        expected |= {f"fit@{dataset}-{d}" for d in TINY["pipeline"]["decoders"]}
        expected |= {f"decode@{dataset}-{d}" for d in TINY["pipeline"]["decoders"]}
        expected |= {f"reconstruct@{dataset}-{p}" for p in pipeline["reconstructions"]}
        expected |= {f"{s}@{dataset}-{p}" for s in ("export", "parity") for p in pipeline["pairs"]}
    assert _stages_run(first) == expected
    report = (tiny_repo / "REPORT.md").read_text()
    assert "Table 3" in report and "Table 4" in report and "| sim-nsd | ours |" in report
    for row in ("ceiling: true z + true c", "floor: another test stimulus", "floor: mean training image",
                "ours − baseline (paired)"):
        assert f"| sim-nsd | {row} |" in report, row
    assert (tiny_repo / "results/evaluate/sim-nsd/grid.png").stat().st_size > 1000
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], tiny_repo)
    assert _stages_run(_run([sys.executable, "-m", "dvc", "repro"], tiny_repo)) == set()


@pytest.mark.slow
def test_changing_one_param_reruns_only_its_dependents(tiny_repo):
    _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["evaluate"]["grid_dpi"] = 100
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _stages_run(_run([sys.executable, "-m", "dvc", "repro"], tiny_repo))
    assert rerun == {"evaluate@sim-nsd", "evaluate@sim-things", "report"}


@pytest.mark.slow
def test_a_change_to_a_module_the_ldm_imports_never_retrains_it(tiny_repo):
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], tiny_repo)
    shared = tiny_repo / "train" / "evaluation" / "metrics.py"  # imported by train_ldm's evaluation and by later stages
    original = shared.read_text()
    try:
        shared.write_text(original + "\n# edited\n")
        rerun = _stages_run(_run([*dvc, "repro", "--dry"], tiny_repo))
        assert "train_ldm" not in rerun and "fit@sim-nsd-ridge-z" in rerun
    finally:
        shared.write_text(original)
    # Without the versioned model (no `dvc pull`), dvc repro stops with an error instead of training.
    shutil.rmtree(tiny_repo / "models" / "ldm")
    refused = _run([*dvc, "repro"], tiny_repo, check=False)
    assert "failed to reproduce 'train_ldm': missing data" in refused and "models/ldm" in refused
    assert not (tiny_repo / "models" / "ldm").exists()
    _run([*dvc, "checkout", "-q", "models/ldm"], tiny_repo)
    assert "up to date" in _run([*dvc, "status"], tiny_repo)


# Stages whose outputs once varied between processes (threads, hash-ordered metadata, text
# encoder states): each is re-run alone in a new process and must write what dvc.lock recorded.
FRESH_PROCESS_STAGES = ("targets@sim-nsd", "attribute_classifier", "fit@sim-nsd-cnn-c", "fit@sim-nsd-gcn-z")


def _recorded_outs(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {out["path"]: out["md5"] for out in lock["outs"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", FRESH_PROCESS_STAGES)
def test_a_stage_rerun_in_a_fresh_process_writes_what_dvc_lock_records(tiny_repo, stage):
    _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    recorded = _recorded_outs(tiny_repo, stage)
    assert recorded, stage
    # --force: run the command even though nothing changed; dvc then re-hashes what it wrote.
    rerun = _run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage], tiny_repo)
    assert _stages_run(rerun) == {stage}
    assert _recorded_outs(tiny_repo, stage) == recorded
