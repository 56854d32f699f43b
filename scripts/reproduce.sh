#!/usr/bin/env bash
# The main job: set up .venv (pinned dependencies), fetch the versioned inputs from the
# embedded DVC remote (simulated raw data + the small LDM's weights: nothing is downloaded),
# run the whole DVC pipeline and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv
# shellcheck disable=SC1091
source .venv/bin/activate
# Fixed threads and hashing make every stage's output bitwise repeatable on one machine kind.
export PYTHONHASHSEED=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1
start=$(date +%s)
dvc pull --quiet -r embedded data.dvc train_ldm
dvc repro "$@"
dvc metrics show
echo "reproduce: done in $(( $(date +%s) - start )) s; 'dvc status' should report everything up to date"
