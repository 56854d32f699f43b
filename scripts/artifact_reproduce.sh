#!/usr/bin/env bash
# Default command of the Docker `artifact` image: scripts/reproduce.sh with the image's
# preinstalled environment (/opt/venv) instead of a virtual environment made at run time.
#
# The project in $BRAINLDM_HOME (/opt/brainldm, read-only) is copied into the workspace
# $BRAINLDM_WORKSPACE (/workspace; mount a volume there to keep the outputs and to resume), the
# simulated raw data and the small LDM are pulled from the embedded DVC remote in the image, then
# `dvc repro [ARGS]` and `dvc metrics show`.
#   BRAINLDM_PARAMS=/config/params.yaml   use this params.yaml (e.g. real NSD data, SD v1.4)
#   BRAINLDM_PULL="data.dvc train_ldm"    what to pull from the embedded remote ("" = nothing)
# Files already in the workspace are kept (a rerun resumes: only changed stages run). The code
# that runs is the image's installed package, so a workspace whose train/, export/ or runtime/
# differs from the image's is refused.
set -euo pipefail

src="${BRAINLDM_HOME:-/opt/brainldm}"
ws="${BRAINLDM_WORKSPACE:-/workspace}"
die() { echo "artifact_reproduce: error: $*" >&2; exit 1; }

[[ -f "$src/dvc.yaml" ]] || die "no project in BRAINLDM_HOME=$src (dvc.yaml missing)"
command -v dvc >/dev/null 2>&1 || die "dvc is not on PATH; this script runs inside the artifact image"
mkdir -p "$ws" 2>/dev/null || die "cannot create the workspace $ws"
[[ -w "$ws" ]] || die "the workspace $ws is not writable by uid $(id -u); give the mounted folder to that user \
(e.g. 'chown $(id -u):$(id -g) DIR' on the host) or run the container with --user \"\$(id -u):\$(id -g)\""

# Copy each project entry into the workspace unless it is there already; each entry appears
# whole or not at all (copied under a temporary name, then renamed).
entries=(.dvc .dvcignore dvc.yaml dvc.lock data.dvc params.yaml pyproject.toml README.md REPORT.md
         requirements train export runtime docs scripts)
for entry in "${entries[@]}"; do
    [[ -e "$src/$entry" && ! -e "$ws/$entry" ]] || continue
    tmp="$ws/.tmp-copy-$entry-$$"
    rm -rf "$tmp"
    cp -R "$src/$entry" "$tmp"
    mv "$tmp" "$ws/$entry"
done
for code in train export runtime; do
    if ! diff -rq --exclude=__pycache__ "$src/$code" "$ws/$code" >/dev/null; then
        die "$ws/$code differs from the image's code ($src/$code), which is what runs; rebuild the image with your changes, or remove $ws/$code"
    fi
done
if [[ -n "${BRAINLDM_PARAMS:-}" ]]; then
    [[ -f "$BRAINLDM_PARAMS" ]] || die "BRAINLDM_PARAMS=$BRAINLDM_PARAMS is not a file"
    cp "$BRAINLDM_PARAMS" "$ws/.params.yaml.tmp-$$"
    mv "$ws/.params.yaml.tmp-$$" "$ws/params.yaml"
fi

cd "$ws"
# No git in the image: DVC runs without SCM; the embedded remote is read in place.
dvc config --local core.no_scm true
dvc remote modify --local embedded url "$src/dvc-store"

# Threads and instruction sets are pinned by every stage's command (dvc.yaml's `pinned`).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1
start=$(date +%s)
read -ra pull <<< "${BRAINLDM_PULL-data.dvc train_ldm}"
if (( ${#pull[@]} )); then
    dvc pull --quiet -r embedded "${pull[@]}"
fi
dvc repro "$@"
dvc metrics show
echo "artifact_reproduce: done in $(( $(date +%s) - start )) s; outputs in $ws"
