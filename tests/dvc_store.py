"""Read versioned outputs straight from the embedded DVC remote (``dvc-store/``), as a
fresh clone has it: what ``dvc pull -r embedded`` would restore, without touching the
working tree."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "dvc-store" / "files" / "md5"


def store_path(md5: str) -> Path:
    """Where the remote keeps an object (``<md5>.dir`` for a folder's listing)."""
    digest = md5.removesuffix(".dir")
    return STORE / digest[:2] / (digest[2:] + (".dir" if md5.endswith(".dir") else ""))


def locked_out(stage: str, path: str) -> dict:
    """The ``outs`` entry of ``path`` in ``stage`` of dvc.lock (md5, size, nfiles)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"][stage]
    return next(o for o in lock["outs"] if o["path"] == path)


def materialize(stage: str, path: str, dest: Path) -> Path:
    """Copy the locked folder output ``path`` of ``stage`` from the remote to ``dest``,
    checking every file's md5. Raises FileNotFoundError if the remote lacks an object."""
    listing = json.loads(store_path(locked_out(stage, path)["md5"]).read_text())
    for entry in listing:
        source, target = store_path(entry["md5"]), dest / entry["relpath"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if hashlib.md5(target.read_bytes()).hexdigest() != entry["md5"]:
            raise ValueError(f"{source}: md5 differs from dvc.lock's listing for {entry['relpath']}")
    return dest
