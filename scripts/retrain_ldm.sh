#!/usr/bin/env bash
# Retrain the small LDM on purpose (50-90 min on 2 CPU cores; train_ldm.device: auto uses a GPU
# when there is one). Its stage is frozen, so `dvc repro` never runs it: this runs the stage's
# command and records the new model, with the code and params it was trained with, in dvc.lock.
# Then, to version the weights:   dvc push -r embedded train_ldm
# Run from the project root with the project's environment active (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m brainldm.train.train_ldm
dvc commit --force train_ldm
