"""The mutation score table (scripts/mutation_summary.py) counts what mutmut wrote."""
from __future__ import annotations

import importlib.util

from tests.dvc_store import ROOT

SPEC = importlib.util.spec_from_file_location("mutation_summary", ROOT / "scripts" / "mutation_summary.py")
summary = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summary)

RESULTS = """\
    brainldm.runtime.ddim.xǁDDIMSchedulerǁstep__mutmut_1: killed
    brainldm.runtime.ddim.xǁDDIMSchedulerǁstep__mutmut_2: survived
    brainldm.runtime.ddim.x_classifier_free_guidance__mutmut_1: timeout
    brainldm.runtime.bundle.x_verify_files__mutmut_7: killed
    brainldm.runtime.bundle.x_verify_files__mutmut_8: no tests
"""


def test_counts_and_scores_per_module(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text(RESULTS, encoding="utf-8")
    assert summary.main([str(path), "--survivors"]) == 0
    out = capsys.readouterr().out
    assert "| brainldm.runtime.ddim | 3 | 1 | 1 | 1 | 0 | 66.7% |" in out  # a timeout counts as detected
    assert "| brainldm.runtime.bundle | 2 | 1 | 0 | 0 | 1 | 50.0% |" in out  # a mutant no test reaches counts
    assert "| total | 5 | 2 | 1 | 1 | 1 | 60.0% |" in out
    assert out.strip().endswith("brainldm.runtime.ddim.xǁDDIMSchedulerǁstep__mutmut_2")


def test_a_file_without_mutants_is_an_error(tmp_path, capsys):
    (tmp_path / "r.txt").write_text("nothing here\n")
    assert summary.main([str(tmp_path / "r.txt")]) == 1
    assert "holds no mutant lines" in capsys.readouterr().err
