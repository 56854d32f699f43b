"""brainldm.runtime must work without torch: it ships to machines that only have the lean extras."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import brainldm.runtime

RUNTIME_DIR = Path(brainldm.runtime.__file__).parent
# Third-party top-level modules the runtime may import: the base dependencies in pyproject.toml
# (numpy, onnxruntime[-gpu], Pillow, h5py, tqdm) and TensorRT from the gpu extra.
ALLOWED_THIRD_PARTY = frozenset({"numpy", "onnxruntime", "PIL", "h5py", "tqdm", "tensorrt", "brainldm"})
SUBPROCESS_TIMEOUT_S = 120

_PROBE = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys

    class _BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import of {name!r})")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    import brainldm.runtime as runtime
    names = sorted(m.name for m in pkgutil.iter_modules(runtime.__path__))
    for name in names:
        importlib.import_module(f"brainldm.runtime.{name}")

    import numpy as np
    from brainldm.runtime import ddim
    sched = ddim.DDIMScheduler.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                            "beta_end": 0.012, "steps_offset": 1, "clip_sample": False})
    sched.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 1, 4, 4, 4)).astype(np.float32)
    timesteps = sched.img2img_timesteps(0.8)
    x = sched.add_noise(x0, noise, int(timesteps[0]))
    for t in timesteps:
        x = sched.step(noise, t, x)  # the true noise: DDIM must land back on x0
    print(json.dumps({"modules": names, "torch_loaded": any(m == "torch" or m.startswith("torch.")
                                                            for m in sys.modules),
                      "max_error": float(np.abs(x - x0).max()), "dtype": str(x.dtype)}))
""")


def test_runtime_imports_and_samples_without_torch():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, f"runtime failed with torch blocked:\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected_modules = sorted(p.stem for p in RUNTIME_DIR.glob("*.py") if p.stem != "__init__")
    assert report["modules"] == expected_modules
    assert "ddim" in report["modules"]
    assert report["torch_loaded"] is False
    assert report["dtype"] == "float32"
    assert report["max_error"] < 1e-4  # with the oracle noise, DDIM inverts add_noise


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_imports_only_lean_dependencies():
    """Static check, so that even an import inside a function (never run above) cannot pull in torch."""
    offenders = {}
    for path in sorted(RUNTIME_DIR.glob("*.py")):
        bad = _top_level_imports(path) - ALLOWED_THIRD_PARTY - set(sys.stdlib_module_names)
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"runtime modules import outside {sorted(ALLOWED_THIRD_PARTY)} + stdlib: {offenders}"
