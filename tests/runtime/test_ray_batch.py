"""``reconstruct --ray``: Ray Data actors give the single-process CLI's files, byte for byte, and survive faults.

Runs on one local Ray instance (2 CPUs, no dashboard, loopback) shared by the module.
Actor classes defined here reach the workers by value (cloudpickle), as this test module
is not importable there.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainldm.runtime import cli
from brainldm.runtime.atomic import atomic_path
from tests.export.tiny_bundle import TEST_IMAGES, build_tiny_bundle, raw_test

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="needs the ray extra (pip install 'brainldm[ray]')")
RAY_CPUS = 2
SAMPLES = 2
N_IMAGES = len(TEST_IMAGES) * SAMPLES
SUBPROCESS_TIMEOUT_S = 120
KILL_MARKER = "kill-one-actor"  # an actor that claims (renames) this file kills itself once


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def betas(tmp_path_factory):
    raw = raw_test()
    path = tmp_path_factory.mktemp("ray_in") / "in.npz"
    np.savez(path, betas=raw["betas"], session=raw["session"], group=raw["image_index"])
    return path


def _args(bundle_dir, betas, out, *extra):
    return ["reconstruct", "--bundle", str(bundle_dir), "--betas", str(betas), "--out", str(out), "--threads", "1",
            "--samples", str(SAMPLES), *extra]


@pytest.fixture(scope="module")
def reference(bundle_dir, betas, tmp_path_factory):
    """The single-process CLI's output folder: {file name: bytes}."""
    out = tmp_path_factory.mktemp("ray_ref") / "out"
    assert cli.main(_args(bundle_dir, betas, out, "--batch-size", "3")) == 0
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; --ray reuses an initialised Ray (and leaves it running)."""
    if not HAS_RAY:
        pytest.skip("needs the ray extra")
    import logging

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _assert_same_files(out: Path, reference: dict, pngs_only: bool = False) -> None:
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.startswith(".")], f"temporary files left: {sorted(names)}"
    expected = {n for n in reference if n.endswith(".png")} if pngs_only else set(reference)
    assert names == expected
    for name in names:
        assert (out / name).read_bytes() == reference[name], f"{name} differs from the single-process CLI's"


@needs_ray
def test_ray_matches_single_process_byte_for_byte(ray_local, bundle_dir, betas, reference, tmp_path):
    out = tmp_path / "out"
    # other batches (2 vs 3) and two actors: noise is keyed by (seed, item, sample), not by batch
    assert cli.main(_args(bundle_dir, betas, out, "--ray", "--actors", "2", "--batch-size", "2")) == 0
    _assert_same_files(out, reference)
    assert len([n for n in reference if n.endswith(".png")]) == N_IMAGES
    assert json.loads((out / "run.json").read_text())["n_items"] == len(TEST_IMAGES)


@needs_ray
def test_killed_actor_is_restarted_and_every_image_is_written_once(ray_local, bundle_dir, betas, reference,
                                                                   tmp_path, monkeypatch):
    from brainldm.runtime import ray_batch

    marker = tmp_path / KILL_MARKER
    marker.write_text("")

    class KillsItselfOnce(ray_batch.ReconstructActor):
        def __call__(self, batch):
            try:
                os.rename(marker, f"{marker}.claimed")  # atomic: exactly one actor wins
            except FileNotFoundError:
                return super().__call__(batch)
            name = f"item{int(batch['item'][0]):04d}_s{int(batch['sample'][0])}.png"
            with atomic_path(self.out / name) as tmp:  # die mid-write: a partial temporary PNG stays behind
                tmp.write_bytes(b"\x89PNG partial")
                os.kill(os.getpid(), signal.SIGKILL)

    swept = []
    real_sweep = ray_batch.sweep_temp_files
    monkeypatch.setattr(ray_batch, "ReconstructActor", KillsItselfOnce)
    monkeypatch.setattr(ray_batch, "sweep_temp_files", lambda out: swept.extend(real_sweep(out)) or swept)
    out = tmp_path / "out"
    assert cli.main(_args(bundle_dir, betas, out, "--ray", "--actors", "2", "--batch-size", "1")) == 0
    assert Path(f"{marker}.claimed").exists() and not marker.exists()  # the kill did happen
    assert len(swept) == 1 and swept[0].name.startswith(".item")  # its partial PNG was left, then removed
    _assert_same_files(out, reference)
    rows = (out / "index.csv").read_text().splitlines()[1:]
    assert len(rows) == len(set(rows)) == N_IMAGES


@needs_ray
def test_interrupted_driver_leaves_only_complete_pngs_and_no_index(ray_local, bundle_dir, betas, reference,
                                                                  tmp_path, monkeypatch):
    import ray.data

    real = ray.data.Dataset.iter_batches

    def interrupt_after_first_batch(self, *args, **kwargs):
        batches = iter(real(self, *args, **kwargs))
        try:
            yield next(batches)
            raise KeyboardInterrupt
        finally:
            batches.close()

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", interrupt_after_first_batch)
    out = tmp_path / "out"
    assert cli.main(_args(bundle_dir, betas, out, "--ray", "--actors", "2", "--batch-size", "1")) \
        == cli.EXIT_INTERRUPTED
    pngs = sorted(out.glob("*.png"))
    assert 1 <= len(pngs) <= N_IMAGES
    assert not (out / "index.csv").exists() and not (out / "run.json").exists()
    _assert_same_files(out, {p.name: reference[p.name] for p in pngs}, pngs_only=True)
    for png in pngs:
        assert np.asarray(Image.open(png)).shape == (16, 16, 3)


@needs_ray
def test_failing_batch_is_a_one_line_error_and_no_index(ray_local, bundle_dir, betas, tmp_path, monkeypatch,
                                                        capsys):
    from brainldm.runtime import ray_batch

    class FailsOnItemTwo(ray_batch.ReconstructActor):
        def __call__(self, batch):
            if 2 in batch["item"]:
                raise RuntimeError("simulated device failure")
            return super().__call__(batch)

    monkeypatch.setattr(ray_batch, "ReconstructActor", FailsOnItemTwo)
    # A logging handler an earlier test left on its (now closed) captured stream would print
    # "--- Logging error --- Traceback" here; that is the test run's, not the command's output.
    monkeypatch.setattr(logging, "raiseExceptions", False)
    out = tmp_path / "out"
    assert cli.main(_args(bundle_dir, betas, out, "--ray", "--actors", "1", "--batch-size", "2")) == 1
    err = capsys.readouterr().err
    # Ray's own logger may write to stderr around our line (order depends on the tests run before).
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: reconstruction failed after ") and "on Ray" in ours[0], err
    assert "RuntimeError: simulated device failure" in ours[0], err
    assert "Traceback" not in err, err
    assert not (out / "index.csv").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


@needs_ray
def test_command_line_starts_and_stops_its_own_local_ray(bundle_dir, betas, reference, tmp_path):
    """The installed entry point with --ray and no address: its own Ray instance, no traceback, same files."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "brainldm.runtime.cli", *_args(bundle_dir, betas, out, "--ray", "--actors", "1",
                                                                     "--batch-size", "4")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and result.stdout.strip() == f"wrote {out}", result.stderr
    _assert_same_files(out, reference)


@needs_ray
def test_unreachable_cluster_is_a_quick_one_line_error(bundle_dir, betas, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "brainldm.runtime.cli", *_args(bundle_dir, betas, out, "--ray", f"127.0.0.1:{port}")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot start or reach Ray at '127.0.0.1:{port}'"), result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p / "x.npy", raw_test()["betas"]), "session is required"),
    (lambda p: np.save(p / "x.npy", np.full((2, 30), np.nan, np.float32)), "60 NaN/Inf values"),
    (lambda p: (p / "x.txt").write_text("1 2 3"), "unsupported input type '.txt'"),
    (lambda p: None, "betas file not found"),
])
def test_bad_input_gives_the_cli_error_before_ray_starts(bundle_dir, tmp_path, capsys, monkeypatch, make, message):
    from brainldm.runtime import ray_batch

    monkeypatch.setattr(ray_batch, "_import_ray", lambda: pytest.fail("Ray was reached despite bad input"))
    make(tmp_path)
    files = list(tmp_path.glob("x.*"))
    path = files[0] if files else tmp_path / "x.npy"
    errors = []
    for extra in ((), ("--ray",)):
        assert cli.main(_args(bundle_dir, path, tmp_path / "out", *extra)) == 1
        errors.append(capsys.readouterr().err)
        assert not (tmp_path / "out").exists()
    assert errors[0] == errors[1] and errors[1].startswith("error: ") and message in errors[1], errors


def test_missing_ray_extra_is_one_line(bundle_dir, betas, tmp_path, capsys, monkeypatch):
    from brainldm.runtime import ray_batch

    real = importlib.util.find_spec
    monkeypatch.setattr(ray_batch.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert cli.main(_args(bundle_dir, betas, tmp_path / "out", "--ray")) == 1
    assert "pip install 'brainldm[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_ray
def test_a_pool_larger_than_the_cluster_is_refused(ray_local, bundle_dir, betas, tmp_path, capsys):
    assert cli.main(_args(bundle_dir, betas, tmp_path / "out", "--ray", "--actors", str(RAY_CPUS + 1))) == 1
    err = capsys.readouterr().err
    assert f"the Ray cluster has {RAY_CPUS} CPUs" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [
    ("--actors", "2"),  # a Ray option without --ray
    ("--ray", "--actors", "0"),
    ("--ray", "--actor-cpus", "0"),
    ("--ray", "--actor-gpus", "-1"),
    ("--ray", "--actor-gpus", "nan"),
])
def test_ray_usage_errors_exit_2(bundle_dir, betas, tmp_path, extra):
    with pytest.raises(SystemExit) as exc:
        cli.main(_args(bundle_dir, betas, tmp_path / "out", *extra))
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


def test_runtime_core_imports_neither_ray_nor_torch():
    """Ray is imported only when --ray runs; even importing ray_batch does not load it."""
    probe = textwrap.dedent("""
        import json, sys
        import brainldm.runtime, brainldm.runtime.cli, brainldm.runtime.reconstructor, brainldm.runtime.ray_batch
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch"))))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
