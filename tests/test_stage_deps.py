"""dvc.yaml's record is honest: every project file a stage imports is among its deps.

Each stage's command names its module (``python -m brainldm.<package>.<module>``); the
module's imports inside the project are followed transitively (lazy imports inside
functions included), and each file reached must be listed as a dep, itself or through a
listed folder. Otherwise editing that file would leave ``dvc status`` "up to date" with
outputs that the code no longer produces. Listed code files must be imported, too, so
that the deps stay exactly what the stage uses.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml's package-dir: import name -> folder of the repository.
PACKAGES = {"brainldm.train": "train", "brainldm.export": "export", "brainldm.runtime": "runtime"}
MODULE_IN_CMD = re.compile(r"-m\s+(brainldm\.[\w.]+)")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The repository file of project module ``name`` (None for third-party modules)."""
    for package, folder in PACKAGES.items():
        if name == package:
            return root / folder / "__init__.py"
        if name.startswith(package + "."):
            path = root / folder / Path(*name[len(package) + 1:].split("."))
            return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
    return None


def _imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` / ``from ... import`` in ``path`` can load (any depth)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from brainldm.train import metrics` imports the submodule metrics.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_files(module: str, root: Path = ROOT) -> set[Path]:
    """Project files that running ``python -m module`` can import, transitively (package
    ``__init__`` files included), as paths relative to ``root``."""
    start = module_file(module, root)
    assert start is not None and start.is_file(), f"stage module {module} has no file under {root}"
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        # Importing a.b.c runs the __init__ of every package above it.
        for package in path.parents:
            if package == root:
                break
            if (package / "__init__.py").is_file():
                todo.append(package / "__init__.py")
        for name in _imported_names(path):
            target = module_file(name, root)
            if target is not None and target.is_file():
                todo.append(target)
    return {p.relative_to(root) for p in seen}


def stage_definitions(root: Path = ROOT) -> dict[str, dict]:
    """dvc.yaml's stages as written (foreach/matrix stages by their template)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _listed(stage: dict) -> list[Path]:
    return [Path(dep) for dep in stage.get("deps", []) if "${" not in dep]


def uncovered(stage: dict, files: set[Path]) -> list[str]:
    """The imported files that no dep of ``stage`` covers (a listed file or a listed folder)."""
    listed = _listed(stage)
    return sorted(str(f) for f in files if not any(f == d or d in f.parents for d in listed))


def unused_code_deps(stage: dict, files: set[Path]) -> list[str]:
    """Listed ``.py`` deps that the stage never imports."""
    return sorted(str(d) for d in _listed(stage) if d.suffix == ".py" and d not in files)


def stage_module(stage: dict) -> str:
    found = MODULE_IN_CMD.search(stage["cmd"])
    assert found, f"command {stage['cmd']!r} names no brainldm module"
    return found.group(1)


STAGES = stage_definitions()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_dep(name):
    stage = STAGES[name]
    files = imported_files(stage_module(stage))
    assert not uncovered(stage, files), f"stage {name}: imported but not in deps: {uncovered(stage, files)}"
    assert not unused_code_deps(stage, files), f"stage {name}: listed but never imported: {unused_code_deps(stage, files)}"


def test_the_check_fails_when_a_dep_is_removed():
    stage = dict(STAGES["fit"])
    files = imported_files(stage_module(stage))
    assert "train/evaluation/metrics.py" in {str(f) for f in files}
    stage["deps"] = [d for d in stage["deps"] if d != "train/evaluation/metrics.py"]
    assert uncovered(stage, files) == ["train/evaluation/metrics.py"]


def test_lazy_imports_inside_functions_are_followed(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "__init__.py").write_text("")
    (tmp_path / "train" / "a.py").write_text("def f():\n    from brainldm.train import b\n")
    (tmp_path / "train" / "b.py").write_text("import numpy\nfrom brainldm.train.c import x\n")
    (tmp_path / "train" / "c.py").write_text("x = 1\n")
    found = {str(p) for p in imported_files("brainldm.train.a", tmp_path)}
    assert found == {"train/__init__.py", "train/a.py", "train/b.py", "train/c.py"}


def test_every_package_init_above_a_module_is_followed(tmp_path):
    (tmp_path / "train" / "sub").mkdir(parents=True)
    (tmp_path / "train" / "__init__.py").write_text("")
    (tmp_path / "train" / "sub" / "__init__.py").write_text("")
    (tmp_path / "train" / "sub" / "a.py").write_text("x = 1\n")
    found = {str(p) for p in imported_files("brainldm.train.sub.a", tmp_path)}
    assert found == {"train/__init__.py", "train/sub/__init__.py", "train/sub/a.py"}
