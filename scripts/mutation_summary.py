"""Per-module mutation score from ``mutmut results --all true`` (scripts/mutation.sh writes it).

Usage: python scripts/mutation_summary.py SCRATCH/mutation-results.txt [--survivors]
Prints a Markdown table (module, mutants, killed, survived, timeout, other, score) and, with
``--survivors``, one line per surviving mutant. Score = killed (timeouts included: a mutant that
makes the tests hang is detected) / every mutant but those not run; a mutant no test
reaches ("no tests") counts against the score.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

# "    brainldm.runtime.ddim.xǁDDIMSchedulerǁstep__mutmut_12: survived"
LINE = re.compile(r"^\s*(?P<name>[\w.ǁ]+)__mutmut_(?P<n>\d+): (?P<status>.+?)\s*$")
KILLED = {"killed", "timeout"}
NOT_RUN = {"not checked", "skipped"}


def module_of(name: str) -> str:
    """The dotted module of a mutmut function key (``pkg.mod.x_func`` or ``pkg.mod.xǁClassǁmethod``)."""
    parts = name.split(".")
    return ".".join(parts[:-1])


def parse(path: Path) -> list[tuple[str, str, str]]:
    """(module, mutant key, status) per mutant line of the results file."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = LINE.match(line)
        if match:
            key = f"{match['name']}__mutmut_{match['n']}"
            rows.append((module_of(match["name"]), key, match["status"]))
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    """Markdown table of per-module counts and scores, with a total row."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for module, _, status in rows:
        counts[module][status] += 1
    lines = ["| module | mutants | killed | survived | timeout | other | score |", "|---|---|---|---|---|---|---|"]
    total = Counter()
    for module in sorted(counts) + ["total"]:
        c = counts[module] if module != "total" else total
        other = sum(v for k, v in c.items() if k not in KILLED | {"survived"})
        ran = sum(v for k, v in c.items() if k not in NOT_RUN)
        score = f"{100 * (c['killed'] + c['timeout']) / ran:.1f}%" if ran else "n/a"
        lines.append(f"| {module} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['timeout']} | {other} "
                     f"| {score} |")
        if module != "total":
            total.update(c)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--survivors", action="store_true", help="also list every surviving mutant")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"error: {args.results} not found; expected the mutation-results.txt of scripts/mutation.sh",
              file=sys.stderr)
        return 1
    rows = parse(args.results)
    if not rows:
        print(f"error: {args.results} holds no mutant lines; expected `mutmut results --all true` output",
              file=sys.stderr)
        return 1
    print(table(rows))
    if args.survivors:
        print("\nsurvivors:")
        print("\n".join(key for _, key, status in rows if status == "survived"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
