"""The repository itself: the embedded DVC remote can restore what the main command pulls,
and it can never receive a user's data by accident (it is not the default remote)."""
from __future__ import annotations

import configparser

import yaml

from tests.dvc_store import ROOT, store_path


def _dvc_config() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return config


def _store_has(md5: str) -> bool:
    return store_path(md5).is_file()


def test_embedded_remote_is_inside_the_repo_and_not_the_default():
    config = _dvc_config()
    assert config.get("'remote \"embedded\"'", "url") == "../dvc-store"
    assert config.get("core", "remote", fallback=None) != "embedded"


def test_embedded_remote_holds_the_raw_data_and_the_small_ldm():
    raw = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert raw["path"] == "data/raw" and _store_has(raw["md5"])
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["train_ldm"]
    ldm = next(o for o in lock["outs"] if o["path"] == "models/ldm")
    assert _store_has(ldm["md5"]) and ldm["size"] <= 20 * 1024 * 1024
