#!/usr/bin/env bash
# Artifact evaluation in one command: clone this repository's committed state into a
# temporary folder, run the main job there (scripts/reproduce.sh: a new .venv, pull, dvc
# repro) and compare every stage output with the committed dvc.lock.
# Usage: scripts/check_reproduction.sh [--keep]   (--keep: leave the clone for inspection)
# Prints per stage: identical / within tolerance / different; exit 0 only when nothing differs
# beyond the tolerances of docs/reproducibility.md.
set -euo pipefail
keep=0
[[ "${1:-}" == "--keep" ]] && keep=1
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/brainldm-check.XXXXXX")"
clone="$work/brainldm"
git clone --quiet --no-hardlinks "$src" "$clone"
cd "$clone"
echo "check_reproduction: clone of $(git rev-parse --short HEAD) in $clone; main job log: $work/reproduce.log"
start=$(date +%s)
# Each log line gets the epoch second it was written, so that every stage's wall time can be read.
stamp() { while IFS= read -r line; do printf '%(%s)T %s\n' -1 "$line"; done; }
if ! scripts/reproduce.sh 2>&1 | stamp > "$work/reproduce.log"; then
    tail -n 30 "$work/reproduce.log" >&2
    echo "check_reproduction: the main job failed (log: $work/reproduce.log)" >&2
    exit 1
fi
echo "check_reproduction: main job done in $(( $(date +%s) - start )) s; seconds per stage (until the next starts):"
awk -v end="$(date +%s)" '/Running stage/ { if (name) printf "  %5d  %s\n", $1 - t, name; t = $1; name = $4 }
    END { if (name) printf "  %5d  %s\n", end - t, name }' "$work/reproduce.log" | tr -d "':"
echo "--- dvc metrics diff (committed -> reproduced) ---"
.venv/bin/dvc metrics diff HEAD || true
echo "--- stage outputs against the committed dvc.lock ---"
status=0
.venv/bin/python scripts/reproduction.py --json "$work/reproduction.json" || status=$?
if [[ $status -eq 0 && $keep -eq 0 ]]; then
    rm -rf "$work"
else
    echo "check_reproduction: clone kept in $clone"
fi
exit $status
