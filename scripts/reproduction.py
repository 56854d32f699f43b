"""Compare a reproduced ``dvc.lock`` with the committed one, stage by stage.

Run by ``scripts/check_reproduction.sh`` inside its fresh clone, after the main job:

    python scripts/reproduction.py [--committed REV] [--json OUT]

For every stage instance of the committed lock: ``identical`` when every output hash is
the same, ``within tolerance`` when the only differing outputs are metrics files whose
documented tolerance (``TOLERANCES``; docs/reproducibility.md says why) holds for every
value (the committed file, from git, against the reproduced one), else ``different``.
``check_reproduction.sh`` also prints ``dvc metrics diff``. Exit status 0 only when no
stage is ``different`` or ``missing``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Tolerance:
    """How far a metrics file may move between processors: numbers by ``abs`` (absolute), and
    every non-number (verdicts such as ``passed``, names, settings) must be equal."""

    abs: float
    why: str
    per_key: tuple[tuple[str, float], ...] = ()  # (dotted key, abs) where a field has another scale

    def abs_for(self, key: str) -> float:
        return dict(self.per_key).get(key, self.abs)


# Outputs that are not bitwise stable across processors, and what the check allows them.
# ONNX Runtime chooses its CPU kernels (AVX2 / AVX-512 / AMX) at run time and has no setting
# that pins them; these files hold differences between ONNX Runtime and torch results, which
# stay below the parity tolerances (1e-4 for predictions and latents, 1e-2 for images).
ORT_DIFFERENCES = ("max abs differences between ONNX Runtime and torch outputs: ONNX Runtime picks "
                   "its CPU kernels by instruction set at run time, with no pin")
TOLERANCES: dict[str, Tolerance] = {
    # latent_tolerance_ratio is latent_max_abs over its parity tolerance (~1e-4): a latent that
    # moves by the allowed 1e-4 moves the ratio by ~1; the verdict `passed` must still be equal
    "results/parity/*.json": Tolerance(abs=1e-4, why=ORT_DIFFERENCES, per_key=(("latent_tolerance_ratio", 1.0),)),
    "results/export/*.json": Tolerance(abs=1e-4, why=ORT_DIFFERENCES),
}


@dataclass
class StageResult:
    """One stage instance: status identical | within tolerance | different | missing."""

    name: str
    status: str
    different: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def stage_outputs(lock: dict) -> dict[str, dict[str, str | None]]:
    """stage name -> {output path: md5} of a parsed dvc.lock."""
    return {name: {o["path"]: o.get("md5") for o in stage.get("outs", [])}
            for name, stage in lock.get("stages", {}).items()}


def tolerance_for(path: str) -> Tolerance | None:
    """The documented tolerance of output ``path`` (None: it must be bitwise identical)."""
    return next((tol for pattern, tol in TOLERANCES.items() if fnmatch.fnmatch(path, pattern)), None)


def flatten(data, prefix: str = "") -> dict[str, object]:
    """JSON leaves by dotted key (lists by index), as ``dvc metrics`` names them."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    out: dict[str, object] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def judge_metrics(path: str, old: dict, new: dict, tol: Tolerance) -> tuple[list[str], list[str]]:
    """(deltas, violations) of ``tol`` between two versions of one metrics file (parsed JSON)."""
    a, b = flatten(old), flatten(new)
    deltas, bad = [], []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        numbers = _is_number(x) and _is_number(y)
        deltas.append(f"{path}:{key} {x} -> {y}" + (f" (diff {y - x:+.3g})" if numbers else ""))
        if not (numbers and abs(y - x) <= tol.abs_for(key)):
            bad.append(f"{path}:{key} {x} -> {y} outside tolerance "
                       f"({'abs ' + str(tol.abs_for(key)) if numbers else 'must be equal'})")
    return deltas, bad


def compare(committed: dict, reproduced: dict, read_old, read_new) -> list[StageResult]:
    """Each committed stage instance judged against the reproduced lock (see the module docstring)."""
    old, new = stage_outputs(committed), stage_outputs(reproduced)
    results = []
    for name in sorted(old):
        if name not in new:
            results.append(StageResult(name, "missing", notes=["not in the reproduced dvc.lock"]))
            continue
        different = sorted(p for p in old[name] if old[name][p] != new[name].get(p))
        result = StageResult(name, "identical" if not different else "within tolerance", different)
        for path in different:
            tol = tolerance_for(path)
            if tol is None:
                result.status = "different"
                result.notes.append(f"{path}: no tolerance (must be bitwise identical)")
                continue
            deltas, violations = judge_metrics(path, read_old(path), read_new(path), tol)
            result.notes += deltas + violations
            if violations:
                result.status = "different"
        results.append(result)
    return results


def _git_json(rev: str):
    def read(path: str):
        done = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else {}
    return read


def _file_json(path: str):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def _print(results: list[StageResult]) -> None:
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.name:<{width}}  {r.status}")
        for line in [*(f"differs: {p}" for p in r.different if r.status == 'different'), *r.notes]:
            print(f"{'':<{width}}    {line}")
    counts = {s: sum(r.status == s for r in results) for s in ("identical", "within tolerance", "different", "missing")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--committed", default="HEAD", help="git revision of the committed dvc.lock (default HEAD)")
    parser.add_argument("--json", type=Path, help="also write the per-stage results here")
    args = parser.parse_args(argv)
    shown = subprocess.run(["git", "show", f"{args.committed}:dvc.lock"], capture_output=True, text=True)
    if shown.returncode != 0 or not Path("dvc.lock").is_file():
        print(f"error: needs the committed dvc.lock ({args.committed}:dvc.lock) and a reproduced ./dvc.lock; "
              "run this in the clone after the main job", file=sys.stderr)
        return 2
    results = compare(yaml.safe_load(shown.stdout), yaml.safe_load(Path("dvc.lock").read_text()),
                      _git_json(args.committed), _file_json)
    _print(results)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if all(r.status in ("identical", "within tolerance") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
