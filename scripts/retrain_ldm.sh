#!/usr/bin/env bash
# Retrain the small LDM on purpose (50-90 min on 2 CPU cores; train_ldm.device: auto uses a GPU
# when there is one). Its stage is frozen, so `dvc repro` never runs it: this runs the stage's
# command and records the new model, with the code and params it was trained with, in dvc.lock.
#   scripts/retrain_ldm.sh               train, then the held-out evaluation
#   scripts/retrain_ldm.sh --skip-train  only re-run the held-out evaluation of the versioned model
# Both run under the numeric pins of dvc.yaml's `pinned` (read from there, not copied).
# Then, to version the weights:   dvc push -r embedded train_ldm
# Run from the project root with the project's environment active (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a pinned <<< "$(python -c 'import yaml; print(next(v["pinned"] for v in yaml.safe_load(open("dvc.yaml"))["vars"] if "pinned" in v))')"
"${pinned[@]}" python -m brainldm.train.ldm.train_ldm "$@"
dvc commit --force train_ldm
