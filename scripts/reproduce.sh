#!/usr/bin/env bash
# The main job: set up .venv (pinned dependencies), fetch the versioned inputs from the
# embedded DVC remote (simulated raw data + the small LDM's weights: nothing is downloaded),
# run the whole DVC pipeline and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv
# shellcheck disable=SC1091
source .venv/bin/activate
# Thread counts and the libraries' instruction sets are pinned in each stage's command (dvc.yaml's
# `pinned`), so that plain `dvc repro` is pinned too; here only what keeps the run offline.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1
start=$(date +%s)
dvc pull --quiet -r embedded data.dvc train_ldm
dvc repro "$@"
python scripts/frozen_status.py   # what `dvc status` does not say about the frozen, versioned LDM
dvc metrics show
echo "reproduce: done in $(( $(date +%s) - start )) s; 'dvc status' should report everything up to date"
