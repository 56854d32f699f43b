"""Every dvc.yaml stage's module has the same two entry points (train/__init__.py's convention):
``run(cfg[, rc], <item>)`` with its config dataclasses first and then the ``foreach`` item in
the order the command passes it, and ``main(argv)`` that goes through ``config.run_stage``."""
from __future__ import annotations

import ast
import importlib
import inspect
import re

import pytest

from tests.test_stage_deps import STAGES, module_file, stage_module

ITEM_OPTION = re.compile(r"--(dataset|decoder|pair)\s")


def run_layout(module) -> tuple[list[str], list[str]]:
    """(annotations of run's leading config parameters, names of its required parameters after them)."""
    params = list(inspect.signature(module.run).parameters.values())
    configs = [str(p.annotation) for p in params if str(p.annotation).endswith("Config")]
    rest = [p.name for p in params[len(configs):] if p.default is inspect.Parameter.empty]
    return configs, rest


def calls_run_stage(path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_stage" for n in ast.walk(main))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_module_has_run_and_main(name):
    module_name = stage_module(STAGES[name])
    module = importlib.import_module(module_name)
    configs, rest = run_layout(module)
    assert configs, f"{module_name}.run takes no config dataclass first"
    assert rest == ITEM_OPTION.findall(STAGES[name]["cmd"]), f"{module_name}.run's item parameters"
    assert calls_run_stage(module_file(module_name)), f"{module_name}.main does not go through run_stage"


def test_the_layout_check_sees_a_swapped_order():
    def run(cfg: FitConfig, decoder: str, dataset: str):  # noqa: F821 (annotations stay strings)
        return cfg, decoder, dataset

    fake = type("Module", (), {"run": staticmethod(run)})
    assert run_layout(fake) == (["FitConfig"], ["decoder", "dataset"])
    assert run_layout(fake)[1] != ITEM_OPTION.findall("python -m x --dataset ${a} --decoder ${b}")
