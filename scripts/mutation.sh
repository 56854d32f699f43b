#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (pinned in the dev extra): each mutant is a
# small change to one function (an operator, a constant, an argument); a mutant the tests still
# pass on is a "survivor" and is either killed by a new test or explained in docs/mutation.md.
#
# mutmut derives a mutant's module name from its file path and finds packages under src/, while
# this repository installs train/, export/ and runtime/ as brainldm.*; so the run happens in a
# scratch copy laid out as src/brainldm/... (the working tree is never mutated).
# Usage: scripts/mutation.sh [SCRATCH_DIR [MUTANT_GLOB...]]   (default: a new temporary folder, every
# mutant; a glob such as "brainldm.runtime.bundle*" limits the run to those mutants)
# Prints mutmut's summary and writes SCRATCH_DIR/mutation-results.txt (one line per mutant).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh .venv
scratch="${1:-$(mktemp -d -t brainldm-mutation.XXXXXX)}"
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$scratch/src/brainldm"
# the working tree as git sees it (tracked and untracked, not ignored), without the pipeline's
# outputs (the tests do not read them, and a running `dvc repro` rewrites them); packages
# moved under src/
git ls-files -co --exclude-standard -z -- . ':!results' ':!REPORT.md' \
    | tar --null -T - -cf - | tar -xf - -C "$scratch"
for package in train export runtime; do
    rm -rf "$scratch/src/brainldm/$package"
    mv "$scratch/$package" "$scratch/src/brainldm/$package"
done
cd "$scratch"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
start=$(date +%s)
"$OLDPWD/.venv/bin/mutmut" run --max-children "${MUTATION_WORKERS:-2}" "$@"
"$OLDPWD/.venv/bin/mutmut" results --all true > mutation-results.txt
echo "mutation: done in $(( $(date +%s) - start )) s; per-mutant results in $scratch/mutation-results.txt"
