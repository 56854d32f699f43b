"""Stage configuration: one frozen dataclass per stage, loaded from its ``params.yaml`` section.

Unknown keys are errors (a typo in params.yaml must not silently fall back to a
default), and so are missing ones: params.yaml states every knob, and a dataclass
default never stands in for a key left out, except where the default means "none"
(``None``, an empty list or mapping: a block that does not apply). The defaults serve
code and tests that build configs directly. Nested dataclasses, tuples and
``dict[str, Dataclass]`` fields are supported. The resolved config (``config_to_dict``) is saved inside every
checkpoint, metrics file and bundle; stages with execution options (``device``, ``dtype``) save
``config_to_record``, which leaves those out at their CPU float32 defaults.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")
DEFAULT_PARAMS = Path("params.yaml")


# What a stage reports as bad input (params, missing or malformed files) rather than a crash.
STAGE_ERRORS = (ValueError, OSError, KeyError)


# Field metadata key of execution options (execution_option, config_to_record).
EXECUTION_OPTION = "brainldm_execution_option"


class ConfigError(ValueError):
    """A params section does not match its stage's config dataclass."""


def run_stage(work: Callable[[], str], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Exit status of a stage's ``main()``: run ``work()`` and print the summary line it returns (0),
    or print ``error: <message>`` to stderr (1) when it raises one of STAGE_ERRORS or ``errors``."""
    try:
        summary = work()
    except STAGE_ERRORS + errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params YAML file into a dict (clear error when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (expected a YAML file with one section per stage)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    return data


def load_config(cls: type[T], section: str, path: str | Path = DEFAULT_PARAMS) -> T:
    """Build ``cls`` (a frozen dataclass) from section ``section`` of the params file."""
    params = load_params(path)
    if section not in params:
        raise ConfigError(f"{path}: missing section '{section}' (needed by {cls.__name__})")
    return from_dict(cls, params[section], where=section, strict=True)


def _means_none(f: dataclasses.Field) -> bool:
    """Whether field ``f``'s default is None or empty, so a params file may leave it out."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return False
    return default is None or (isinstance(default, (tuple, list, dict)) and not default)


def from_dict(cls: type[T], data: Any, where: str = "", strict: bool = False) -> T:
    """Recursively convert plain data into dataclass ``cls``; unknown keys raise ConfigError, and so
    do missing ones: those without a default, and with ``strict`` (params files) every key whose
    default is not None or empty."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}" if where else name, strict)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and ((f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                                or (strict and not _means_none(f)))
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing} for {cls.__name__}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, strict: bool = False) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, strict)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(non_none[0], value, where, strict) if len(non_none) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(val_tp, v, f"{where}.{k}", strict) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads exponents without a dot (1e-3) as strings; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-serialisable data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def execution_option(default: str) -> Any:
    """A dataclass field saying where or in what precision a stage computes (``device``, ``dtype``),
    not what: see :func:`config_to_record`."""
    return dataclasses.field(default=default, metadata={EXECUTION_OPTION: True})


def config_to_record(config: Any) -> dict[str, Any]:
    """``config_to_dict`` as saved inside a stage's outputs: execution options left out where they hold
    their default (CPU, float32), with which every output was made before they existed, so that the
    options' arrival left those outputs' bytes, and DVC's hashes of them, as they were. Top level only."""
    record = config_to_dict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get(EXECUTION_OPTION) and getattr(config, f.name) == f.default:
            del record[f.name]
    return record


def config_to_json(config: Any) -> str:
    """The resolved config's record (:func:`config_to_record`) as a canonical JSON string (sorted keys)."""
    return json.dumps(config_to_record(config), sort_keys=True)
