#!/usr/bin/env bash
# Do dvc.yaml's numerics pins make results independent of the processor? Runs
# bench/numerics_probe.py under the pins natively and on QEMU-emulated processors of other
# makes and instruction sets (qemu-user's TCG: AVX2 but no AVX-512, its own cache sizes and
# vendor string), and lists the kernel families whose results differ from the native run.
# Needs qemu-user (Debian: apt-get install qemu-user) and the project's .venv. ~10 min on 2 cores.
# Usage: bench/emulated_processors.sh [CPU_MODEL ...]   (default: Haswell EPYC-Rome)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "error: qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(Haswell EPYC-Rome)
# The pins exactly as every stage command carries them.
read -r -a pins <<< "$(.venv/bin/python -c 'import yaml; print(yaml.safe_load(open("dvc.yaml"))["vars"][0]["pinned"])')"
out="bench/results/emulated_processors.json"
probe() { "${pins[@]}" "$@" .venv/bin/python bench/numerics_probe.py 2> >(grep -v "TCG doesn't support" >&2); }
native="$(probe)"
# The same machine without the pins (threads only), to show what the pins change here.
unpinned="$(env OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 .venv/bin/python bench/numerics_probe.py)"
declare -A runs=([native]="$native" [native-unpinned]="$unpinned")
for model in "${models[@]}"; do
    runs[$model]="$(probe qemu-x86_64 -cpu "$model")"
done
{
    printf '{"native_cpu": "%s", "pins": "%s", "runs": {' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "${pins[*]}"
    sep=""
    for name in "${!runs[@]}"; do printf '%s"%s": %s' "$sep" "$name" "${runs[$name]}"; sep=", "; done
    printf '}}\n'
} > "$out"
.venv/bin/python - "$out" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
native = data["runs"]["native"]
for name, run in sorted(data["runs"].items()):
    if name != "native":
        differ = sorted(k for k in native if run.get(k) != native[k])
        print(f"{name}: {len(native) - len(differ)}/{len(native)} identical to native; differ: {differ or 'none'}")
PY
