"""fit and train_ldm launched by torchrun: 2 CPU processes (gloo) on tiny data.

Each launch runs in its own session under a timeout and is killed whole when it runs over (a
rank that leaves a training loop alone leaves the others waiting in a collective). A
``sitecustomize`` on the workers' PYTHONPATH logs every rename onto the output folder with the
renaming process's RANK (runtime/atomic.py's helpers end in ``os.replace``), so that "rank 0
alone writes, each output once" is observed rather than assumed.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainldm.train.config import config_to_dict
from brainldm.train.decoding.decoders import load_checkpoint
from brainldm.train.decoding import fit
from tests.train.decoding.test_fit import DECODERS, fit_config, make_fake_data

LAUNCH_TIMEOUT_S = 150  # measured 35 s (fit) and 32 s (train_ldm) on 2 loaded cores
NETWORKS = ("cnn-z", "vae-z", "gcn-z")
# 2 processes vs 1: the same global minibatches, initial weights and optimiser; they differ by
# BatchNorm statistics over half-batch shards (16 rows instead of 32), rank 1's own dropout / VAE
# noise and float summation order. Measured best validation MSE (standardised targets, chance
# ~1): +2% (cnn), +4% (vae), +9% (gcn); 25% is ~3x the largest.
VAL_RTOL = 0.25
# train_ldm shards every global batch exactly (no batch statistics: GroupNorm), so only float
# summation order differs (shard means averaged, gradients all-reduced): measured 4e-7 relative.
LDM_LOSS_RTOL = 1e-4

SITECUSTOMIZE = '''
import os
_replace = os.replace


def _logged(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    root = os.environ["WRITES_UNDER"]
    if "RANK" in os.environ and os.path.abspath(dst).startswith(root + os.sep):
        with open(os.environ["WRITES_LOG"], "a") as log:
            log.write(os.environ["RANK"] + " " + os.path.relpath(dst, root) + "\\n")


os.replace = _logged
'''

# What `python -m brainldm.train.decoding.fit` runs (main), once per decoder: one launch pays the imports once.
FIT_DRIVER = '''
import sys
from brainldm.train.decoding.fit import main

for decoder in sys.argv[2:]:
    if main(["--params", sys.argv[1], "--dataset", "fake", "--decoder", decoder]):
        sys.exit(1)
'''


def torchrun(tmp_path: Path, *args: str) -> tuple[str, list[tuple[str, str]]]:
    """Run ``torchrun --nproc_per_node 2 --standalone ARGS`` writing under ``tmp_path/out``; returns
    its stdout and the logged renames ``(rank, path relative to out)``."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "writes.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
               WRITES_UNDER=str(tmp_path / "out"), WRITES_LOG=str(log), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: its own session
        out, err = proc.communicate()
        pytest.fail(f"torchrun ran over {LAUNCH_TIMEOUT_S} s (a rank waiting for another?):\n{err[-3000:]}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{err[-4000:]}"
    writes = [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.exists() else []
    return out, writes


def best_val_loss(loss_csv: Path) -> float:
    return min(float(row["val_loss"]) for row in csv.DictReader(loss_csv.open()))


def test_fit_cnn_vae_gcn_under_torchrun(tmp_path):
    data = make_fake_data(tmp_path / "data")
    out = tmp_path / "out"
    section = {"prepared_dir": str(data / "prepared"), "targets_dir": str(data / "targets"),
               "models_dir": str(out / "models"), "results_dir": str(out / "results"), "threads": 1,
               "std_floor": 1e-6, "device": "cpu", "decoders": {n: DECODERS[n] for n in NETWORKS}}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"fit": section}))
    (tmp_path / "driver.py").write_text(FIT_DRIVER)
    stdout, writes = torchrun(tmp_path, str(tmp_path / "driver.py"), str(params), *NETWORKS)
    # rank 0 alone wrote, each output once, and left no temporary file
    expected = [(f"models/fake/{n}.safetensors", f"results/fake/{n}/loss.csv", f"results/fake/{n}/metrics.json")
                for n in NETWORKS]
    assert sorted(writes) == sorted(("0", path) for paths in expected for path in paths)
    assert sorted(p.name for p in (out / "models" / "fake").iterdir()) == sorted(f"{n}.safetensors" for n in NETWORKS)
    summaries = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [s["decoder"] for s in summaries] == list(NETWORKS)  # one summary per fit: rank 1 prints none
    single = fit_config(data, **{n: DECODERS[n] for n in NETWORKS})
    for name, summary in zip(NETWORKS, summaries):
        assert summary == json.loads((out / "results" / "fake" / name / "metrics.json").read_text())
        assert load_checkpoint(out / "models" / "fake" / f"{name}.safetensors").config["world_size"] == 2
        fit.run(single, "fake", name)
        one = best_val_loss(data / "results" / "fit" / "fake" / name / "loss.csv")
        two = best_val_loss(out / "results" / "fake" / name / "loss.csv")
        assert two == pytest.approx(one, rel=VAL_RTOL), name
        assert "world_size" not in load_checkpoint(data / "models" / "fake" / f"{name}.safetensors").config


def test_train_ldm_under_torchrun(tmp_path):
    from brainldm.train.ldm import train_ldm as L
    from tests.train.ldm.test_train_ldm import tiny_config

    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text("train_ldm: " + json.dumps(config_to_dict(tiny_config(out))))
    stdout, writes = torchrun(tmp_path, "-m", "brainldm.train.ldm.train_ldm", "--params", str(params))
    assert {rank for rank, _ in writes} == {"0"}
    # the pipeline folder (renamed whole), its metrics and the stage's metrics, once each (names
    # starting with "." are files the libraries rename inside the temporary folder)
    assert sorted(path for _, path in writes if not path.startswith(".")) == ["ldm", "ldm/metrics.json", "m.json"]
    assert stdout.count("trained on cpu") == 1 and json.loads((out / "m.json").read_text())["n_images"] == 4
    log = json.loads((out / "ldm" / "training_log.json").read_text())
    single = L.run(tiny_config(tmp_path / "single"))
    assert log["world_size"] == 2 and "world_size" not in single
    for part in ("vae", "unet"):
        np.testing.assert_allclose(log[part]["losses"], single[part]["losses"], rtol=LDM_LOSS_RTOL)
    assert log["scaling_factor"] == pytest.approx(single["scaling_factor"], rel=LDM_LOSS_RTOL)
