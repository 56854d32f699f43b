"""What the numerics pins cost: stage commands timed with and without dvc.yaml's `pinned` prefix.

    python bench/bench_pins.py [--stages targets@sim-nsd fit@sim-nsd-cnn-c ...] [--out bench/results/pins.json]

Runs each stage's command (as dvc.yaml resolves it) in a scratch copy of the workspace (after
a full `dvc repro`, so every input exists), pinned and unpinned back to back, both with the
same thread counts, and prints the wall times and their ratio. The workspace itself is not
touched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STAGES = ("targets@sim-nsd", "fit@sim-nsd-cnn-c", "fit@sim-nsd-ridge-c", "reconstruct@sim-nsd-ours",
                  "evaluate@sim-nsd", "export@sim-nsd-ours", "parity@sim-nsd-ours")
# Copied into the scratch folder: what the stages read (and write over).
INPUTS = ("dvc.yaml", "params.yaml", "data", "models", "results", "bundles")


def resolved_commands(names: list[str]) -> dict[str, str]:
    """Stage name -> its command with dvc.yaml's variables filled in."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {name: repo.stage.collect(name)[0].cmd for name in names}


def unpinned(cmd: str) -> str:
    """The command without the `env VAR=... ` prefix, keeping only the thread counts (a fair comparison)."""
    if not cmd.startswith("env "):
        return cmd
    words = cmd.split()
    first = next(i for i, w in enumerate(words[1:], 1) if "=" not in w)
    threads = [w for w in words[1:first] if "NUM_THREADS" in w or w.startswith("PYTHONHASHSEED")]
    return " ".join(["env", *threads, *words[first:]])


def timed(cmd: str, cwd: Path) -> float:
    # The stage commands call `python`: this interpreter's, also when its environment is not activated.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    done = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: `{cmd}` failed in {cwd}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pins.json")
    args = parser.parse_args(argv)
    commands = resolved_commands(args.stages)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pins-") as scratch:
        for name in INPUTS:
            source = REPO / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, Path(scratch) / name)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        for name, cmd in commands.items():
            pinned_s, unpinned_s = timed(cmd, Path(scratch)), timed(unpinned(cmd), Path(scratch))
            results[name] = {"pinned_s": round(pinned_s, 1), "unpinned_s": round(unpinned_s, 1),
                             "ratio": round(pinned_s / unpinned_s, 2)}
            print(f"{name:<28} pinned {pinned_s:7.1f} s   unpinned {unpinned_s:7.1f} s   x{pinned_s / unpinned_s:.2f}")
    total_p = sum(r["pinned_s"] for r in results.values())
    total_u = sum(r["unpinned_s"] for r in results.values())
    print(f"{'all':<28} pinned {total_p:7.1f} s   unpinned {total_u:7.1f} s   x{total_p / total_u:.2f}")
    args.out.write_text(json.dumps({"stages": results, "cpu": _cpu_model()}, indent=1))
    return 0


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


if __name__ == "__main__":
    sys.exit(main())
