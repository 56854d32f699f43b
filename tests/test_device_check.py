"""bench/device_check.py's --dry mode runs end to end on CPU and writes the JSON a GPU run would."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.py"
# a file with gpu-marked tests of every compute stage: pytest -m gpu collects them, and skips them here
GPU_TESTS = "tests/train/test_compute_options.py"


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "dry.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--tests", GPU_TESTS,
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc


def test_dry_run_records_every_part(dry):
    results, proc = dry
    assert "every part ran" in proc.stdout
    assert results["dry"] is True and results["failed_parts"] == []
    assert set(results) >= {"environment", "gpu_tests", "reference_sd14", "runtime_backends", "bench_runtime_gpu",
                            "part_seconds", "started"}
    assert results["bench_runtime_gpu"] == {"status": "not run", "reason": "dry mode (CPU)"}


def test_gpu_tests_are_selected_and_counted(dry):
    tests = dry[0]["gpu_tests"]
    assert tests["status"] == "ok" and tests["exit_code"] == 0 and "-m" in tests["command"]
    total = tests["passed"] + tests["failed"] + tests["errors"] + tests["skipped"]
    assert total >= 6 and tests["failed"] == tests["errors"] == 0  # 1 decode + 3 reconstruct + 2 parity
    if not dry[0]["environment"]["cuda_available"]:
        assert tests["skipped"] == total and tests["skip_reasons"] == ["needs a CUDA GPU"]


def test_reference_timing_uses_the_reconstruct_path_on_cpu(dry):
    ref = dry[0]["reference_sd14"]
    assert (ref["device"], ref["dtype"], ref["resolution"], ref["steps"]) == ("cpu", "float32", 64, 4)
    assert sorted(ref["batches"], key=int) == ["1", "2"]
    for batch, entry in ref["batches"].items():
        assert entry["image_shape"] == [64, 64, 3] and entry["finite_fraction"] == 1.0
        assert entry["images_per_s"] > 0 and math.isclose(entry["images_per_s"] * entry["seconds_per_batch"],
                                                           int(batch))


def test_gpu_backends_say_why_they_did_not_run(dry):
    backends = dry[0]["runtime_backends"]
    assert set(backends) == {"ort-cuda", "ort-trt", "tensorrt"}
    for name, entry in backends.items():
        assert entry["status"] in ("not run", "available"), name
        if entry["status"] == "not run":
            assert entry["reason"], name
    if not dry[0]["environment"]["cuda_available"]:
        assert all(entry["status"] == "not run" for entry in backends.values())


def test_a_missing_params_file_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path / "x.json"), "--params",
                           str(tmp_path / "none.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == f"error: params file not found: {tmp_path / 'none.yaml'}\n"
    assert not (tmp_path / "x.json").exists()
