"""What `dvc status` leaves out for frozen stages: which of their deps changed since they ran.

    python scripts/frozen_status.py

A frozen stage (the versioned small LDM, `train_ldm`) is never re-run by `dvc repro`, and
`dvc status` does not look at its deps. This prints, per frozen stage, the deps (code files,
params) that differ from what its `dvc.lock` entry recorded, i.e. what a retrain would pick
up. Always exits 0: it informs, it does not judge.
"""
from __future__ import annotations

import sys


def frozen_changes() -> dict[str, list[str]]:
    """Frozen stage -> ["<dep>: <change>", ...] against its dvc.lock entry."""
    from dvc.repo import Repo

    out: dict[str, list[str]] = {}
    with Repo() as repo, repo.lock:
        for stage in repo.index.stages:
            if not getattr(stage, "frozen", False):
                continue
            stage.frozen = False  # let DVC compare the deps as it would for any other stage
            # stage.status() -> {name: [{"changed deps": {dep: "modified" | {param: ...}}}, "changed command", ...]}
            entries = [e for e in stage.status().get(stage.addressing, []) if isinstance(e, dict)]
            deps = {dep: what for e in entries for dep, what in e.get("changed deps", {}).items()}
            out[stage.addressing] = sorted(f"{dep}: {what if isinstance(what, str) else sorted(what)}"
                                           for dep, what in deps.items())
    return out


def main() -> int:
    for name, changes in frozen_changes().items():
        if changes:
            print(f"{name} is frozen (versioned, not re-run); its dvc.lock entry records what it was built from. "
                  f"Changed since: {'; '.join(changes)}")
        else:
            print(f"{name} is frozen (versioned, not re-run); its deps are as recorded in dvc.lock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
