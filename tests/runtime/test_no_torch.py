"""brainldm.runtime must work without torch: it ships to machines that only have the lean extras."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import brainldm.runtime
from brainldm.runtime.reconstructor import Reconstructor
from tests.export.tiny_bundle import TEST_IMAGES, build_tiny_bundle, raw_test

RUNTIME_DIR = Path(brainldm.runtime.__file__).parent
# Third-party top-level modules the runtime may import: the base dependencies in pyproject.toml
# (numpy, onnxruntime[-gpu], Pillow, h5py, tqdm) and TensorRT from the gpu extra.
ALLOWED_THIRD_PARTY = frozenset({"numpy", "onnxruntime", "PIL", "h5py", "tqdm", "tensorrt"})
# First-party imports must stay inside the runtime: brainldm.train / brainldm.export pull in torch.
RUNTIME_PACKAGE = "brainldm.runtime"
SUBPROCESS_TIMEOUT_S = 120

_PROBE = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys

    class _BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import of {name!r})")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    bundle_dir, betas_file = sys.argv[1], sys.argv[2]
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
    # A real bundle through the public API: every ONNX graph, the preprocessing, the loop.
    from brainldm.runtime.reconstructor import Reconstructor
    raw = np.load(betas_file)
    images = Reconstructor(bundle_dir, threads=1).reconstruct(raw["betas"], raw["session"], raw["image_index"],
                                                              samples=1)
    np.save(betas_file + ".images.npy", images)
    print(json.dumps({"modules": names, "torch_loaded": any(m == "torch" or m.startswith("torch.")
                                                            for m in sys.modules),
                      "first_party": sorted(m for m in sys.modules if m.startswith("brainldm")),
                      "max_error": float(np.abs(x - x0).max()), "dtype": str(x.dtype)}))
""")


@pytest.fixture(scope="module")
def bundle_and_betas(tmp_path_factory):
    """A tiny exported bundle and its raw test betas (.npz), built here where torch is available."""
    root = tmp_path_factory.mktemp("no_torch")
    bundle_dir = build_tiny_bundle(root)
    betas_file = root / "betas.npz"
    np.savez(betas_file, **raw_test())
    return bundle_dir, betas_file


def test_runtime_imports_and_reconstructs_without_torch(bundle_and_betas):
    bundle_dir, betas_file = bundle_and_betas
    result = subprocess.run([sys.executable, "-c", _PROBE, str(bundle_dir), str(betas_file)], capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, f"runtime failed with torch blocked:\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected_modules = sorted(p.stem for p in RUNTIME_DIR.glob("*.py") if p.stem != "__init__")
    assert report["modules"] == expected_modules
    assert "ddim" in report["modules"]
    assert report["torch_loaded"] is False
    outside = [m for m in report["first_party"] if m != "brainldm" and not _in_runtime(m)]
    assert not outside, f"the runtime loaded first-party modules outside {RUNTIME_PACKAGE}: {outside}"
    assert report["dtype"] == "float32"
    assert report["max_error"] < 1e-4  # with the oracle noise, DDIM inverts add_noise
    # the torch-free run produced the same images as the same call in this (torch) process
    raw = np.load(betas_file)
    expected = Reconstructor(bundle_dir, threads=1).reconstruct(raw["betas"], raw["session"], raw["image_index"],
                                                                samples=1)
    images = np.load(f"{betas_file}.images.npy")
    assert images.shape == (len(TEST_IMAGES), 1, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)


def _in_runtime(module: str) -> bool:
    return module == RUNTIME_PACKAGE or module.startswith(RUNTIME_PACKAGE + ".")


def _imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top == "brainldm":
        return _in_runtime(module)
    return top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names


def test_runtime_imports_only_lean_dependencies():
    """Static check, so that even an import inside a function (never run above) cannot pull in torch."""
    offenders = {}
    for path in sorted(RUNTIME_DIR.glob("*.py")):
        bad = {m for m in _imported_modules(path) if not _allowed(m)}
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, (f"runtime modules import outside {RUNTIME_PACKAGE}, {sorted(ALLOWED_THIRD_PARTY)} and "
                           f"the stdlib: {offenders}")
