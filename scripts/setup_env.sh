#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned dependencies.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv). Needs Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "error: Python 3.11 is required (found $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
stamp="$venv/.brainldm-installed"
wanted="$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    exit 0
fi
echo "setting up $venv (pinned dependencies from requirements/constraints.txt) ..." >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip==25.3" "setuptools==80.9.0" wheel
# torch is pinned to 2.13.0 (the CPU build); the constraints file pins everything else.
"$venv/bin/python" -m pip install --quiet -c requirements/constraints.txt -e ".[train,dev]"
echo "$wanted" > "$stamp"
