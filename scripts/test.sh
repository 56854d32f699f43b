#!/usr/bin/env bash
# Run the whole test suite (sets up .venv with pinned dependencies first).
# Extra arguments go to pytest, e.g. scripts/test.sh -k ddim
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv
exec .venv/bin/python -m pytest -q "$@"
