"""Shared pytest configuration: GPU-only tests skip cleanly where no CUDA device exists; parametrize
ids are plain words."""
from __future__ import annotations

import importlib.util
import re

import pytest


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


def pytest_make_parametrize_id(config, val, argname):
    """Word characters only: an id holding an error message's spaces, brackets or backslashes cannot be
    handed back to pytest as a node id, which is how mutmut (scripts/mutation.sh) runs a test."""
    text = val if isinstance(val, str) else getattr(val, "__name__", None) if callable(val) else None
    if text is None:
        return None
    return re.sub(r"\W+", "_", text).strip("_")[:48] or argname
