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
pip_install() {
    # Mirrors configured as extra indexes warn about every package they lack: keep real errors only.
    "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
# torch is pinned to 2.13.0 (the CPU build); the constraints file pins everything else.
# A second --quiet (errors only) for this step: setuptools' editable build otherwise prints a
# warning box about same-named folders on every fresh install, which no user can act on.
pip_install --quiet -c requirements/constraints.txt -e ".[train,dev,ray]"
echo "$wanted" > "$stamp"
