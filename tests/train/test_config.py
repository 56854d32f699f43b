from dataclasses import dataclass, field

import pytest

from brainldm.train.config import ConfigError, config_to_dict, from_dict, load_config
from tests.dvc_store import ROOT


@dataclass(frozen=True)
class Inner:
    labels: tuple[int, ...]
    atlas: str = "prf-visualrois"


@dataclass(frozen=True)
class Outer:
    seed: int
    rate: float = 0.5
    rois: dict[str, Inner] = field(default_factory=dict)
    note: str | None = None


def test_nested_conversion_and_roundtrip():
    cfg = from_dict(Outer, {"seed": 3, "rate": 1, "rois": {"V1": {"labels": [1, 2]}}})
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.rois["V1"] == Inner(labels=(1, 2))
    assert config_to_dict(cfg) == {"seed": 3, "rate": 1.0, "rois": {"V1": {"labels": [1, 2], "atlas": "prf-visualrois"}}, "note": None}


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="seeed"):
        from_dict(Outer, {"seeed": 1})
    with pytest.raises(ConfigError, match=r"rois\.V1.*lables"):
        from_dict(Outer, {"seed": 1, "rois": {"V1": {"lables": [1]}}})


def test_missing_and_wrong_type():
    with pytest.raises(ConfigError, match="missing required"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(Outer, {"seed": "x"})


def test_load_config_from_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("stage:\n  seed: 7\n  rate: 0.5\n")
    assert load_config(Outer, "stage", path).seed == 7
    with pytest.raises(ConfigError, match="missing section 'other'"):
        load_config(Outer, "other", path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, "stage", tmp_path / "nope.yaml")


def test_float_fields_accept_yaml_exponents_and_reject_text():
    assert from_dict(Outer, {"seed": 1, "rate": "1e-3"}).rate == 1e-3
    with pytest.raises(ConfigError, match="rate: expected a number"):
        from_dict(Outer, {"seed": 1, "rate": "fast"})
    with pytest.raises(ConfigError, match="rate: expected a number"):
        from_dict(Outer, {"seed": 1, "rate": [1]})


def test_run_stage_prints_the_summary_or_a_clear_error(capsys):
    from brainldm.train.config import run_stage

    assert run_stage(lambda: "wrote x") == 0
    assert capsys.readouterr().out == "wrote x\n"

    def bad_input() -> str:
        raise FileNotFoundError("data/prepared/x.h5 not found")
    assert run_stage(bad_input) == 1
    assert capsys.readouterr().err == "error: data/prepared/x.h5 not found\n"

    def stage_specific() -> str:
        raise RuntimeError("parity beyond tolerance")
    assert run_stage(stage_specific, errors=(RuntimeError,)) == 1
    with pytest.raises(RuntimeError):  # a bug is not bad input: it propagates with its traceback
        run_stage(stage_specific)


def test_params_files_state_every_key_that_has_a_real_default(tmp_path):
    """load_config (strict): a key left out is an error naming it, unless its default means none."""
    path = tmp_path / "params.yaml"
    path.write_text("outer:\n  seed: 1\n  rois: {V1: {labels: [1], atlas: x}}\n")
    with pytest.raises(ConfigError, match=r"outer: missing required key\(s\) \['rate'\]"):
        load_config(Outer, "outer", path)
    path.write_text("outer:\n  seed: 1\n  rate: 0.5\n  rois: {V1: {labels: [1]}}\n")
    with pytest.raises(ConfigError, match=r"outer.rois.V1: missing required key\(s\) \['atlas'\]"):
        load_config(Outer, "outer", path)
    path.write_text("outer:\n  seed: 1\n  rate: 0.5\n")  # rois {} and note None: blocks that do not apply
    assert load_config(Outer, "outer", path) == Outer(seed=1)


def test_every_stage_section_of_params_yaml_loads_strictly():
    from tests.stage_configs import STAGE_CONFIGS

    for section, cls in STAGE_CONFIGS.items():
        load_config(cls, section, ROOT / "params.yaml")
