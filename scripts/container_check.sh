#!/usr/bin/env bash
# Container check without a Docker engine: build the Dockerfile's images with buildah (chroot
# isolation, vfs storage) on a Debian base image made here from Debian packages (debootstrap),
# run them, and check what they contain.
#
#   scripts/container_check.sh              the `runtime` target (CPU onnxruntime, same pinned
#                                           versions as .venv): run its ENTRYPOINT on the default
#                                           bundle and compare the images with the host runtime's
#   scripts/container_check.sh --artifact   the full `artifact` target (slower): build it, run
#                                           `dvc --version` and the package imports inside it
#   options: --artifact-pipeline ARGS...    (with --artifact) also run the image's default command
#                                           with these `dvc repro` arguments (e.g. `simulate`)
#            --no-cache                     rebuild every layer
#            --rebuild-base                 recreate the Debian base image
#
# Needs root and: apt-get install -y buildah podman debootstrap (Debian/Ubuntu packages).
# Environment (all optional):
#   BASE_IMAGE      base to build on (default localhost/brainldm-base:bookworm-minbase, created
#                   with debootstrap --variant=minbase from DEBIAN_MIRROR, DEBIAN_SUITE)
#   CA_BUNDLE       CA bundle for package downloads behind a TLS-intercepting proxy; default
#                   $PIP_CERT, pip's `cert` setting or /etc/ssl/certs/ca-certificates.crt. Passed
#                   as the build secret `ca_bundle`, so it is in no layer (checked below).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST
#                   package mirrors (default: this host's pip settings); local folders and file://
#                   indexes are mounted read-only into the build.
#   TORCH_INDEX_URL (artifact) extra index for torch's CPU build; default empty: torch==2.13.0
#                   comes from the mirrors above, as for .venv.
#   STORAGE_DRIVER  containers storage driver (default vfs)
#   KEEP_WORKDIR=1  keep the temporary folder (inputs, outputs, saved image)
# Prints the build time, the image size and the result; exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir="$PWD"

die() { echo "container_check: error: $*" >&2; exit 1; }
log() { echo "container_check: $*" >&2; }

target=runtime
no_cache=()
rebuild_base=0
pipeline_args=()
run_pipeline=0
while (( $# )); do
    case "$1" in
        --artifact) target=artifact ;;
        --artifact-pipeline) target=artifact; run_pipeline=1; shift; pipeline_args=("$@"); break ;;
        --no-cache) no_cache=(--no-cache) ;;
        --rebuild-base) rebuild_base=1 ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "container_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

[[ "$(id -u)" == 0 ]] || die "run as root (buildah with chroot isolation and vfs storage, as used here, needs root)"
missing=()
for tool in buildah podman tar sha256sum; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
(( ${#missing[@]} == 0 )) || die "missing ${missing[*]}; install with: apt-get install -y buildah podman"
venv_python="$root_dir/.venv/bin/python"
[[ -x "$venv_python" && -x "$root_dir/.venv/bin/brainldm-runtime" ]] \
    || die "the host runtime (.venv) is missing; create it with scripts/setup_env.sh"

driver="${STORAGE_DRIVER:-vfs}"
B=(buildah --storage-driver "$driver")
P=(podman --storage-driver "$driver")
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base="${BASE_IMAGE:-localhost/brainldm-base:${suite}-minbase}"
image="localhost/brainldm:${target}-check"

work="$(mktemp -d "${TMPDIR:-/tmp}/brainldm-container-check.XXXXXX")"
containers=()
cleanup() {
    local c
    for c in "${containers[@]}"; do "${B[@]}" rm "$c" >/dev/null 2>&1 || true; done
    if [[ "${KEEP_WORKDIR:-0}" == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# ---- the base image, from Debian packages --------------------------------------------------
if (( rebuild_base )) || ! "${P[@]}" image exists "$base"; then
    [[ "$base" == localhost/brainldm-base:* ]] \
        || die "BASE_IMAGE=$base is not in the local image store (only localhost/brainldm-base:* is created here)"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing; install with: apt-get install -y debootstrap"
    log "creating $base with debootstrap --variant=minbase $suite from $mirror"
    rootfs="$work/rootfs"
    debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # Like the official Debian images: no package caches or lists in the base.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    # The image is tagged only after the whole root filesystem was imported.
    tar --numeric-owner -C "$rootfs" -c . | "${P[@]}" import --quiet --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$rootfs"
fi

# ---- package mirrors and the CA bundle, as on this host --------------------------------------
pip_setting() {  # value of PIP_<NAME> from the environment, else from pip's configuration
    local env_name="PIP_$(tr 'a-z-' 'A-Z_' <<< "$1")"
    if [[ -n "${!env_name:-}" ]]; then echo "${!env_name}"; return; fi
    "$venv_python" -m pip config get "global.$1" 2>/dev/null || true
}
build_args=(--build-arg "BASE_IMAGE=$base")
volumes=()
mount_local() {  # mount a local folder (or a file:// URL's folder) read-only at the same path
    local path="${1#file://}"
    [[ "$path" == /* && -e "$path" ]] || return 0
    volumes+=(-v "$path:$path:ro")
}
for setting in index-url extra-index-url find-links trusted-host; do
    value="$(pip_setting "$setting")"
    [[ -n "$value" ]] || continue
    build_args+=(--build-arg "PIP_$(tr 'a-z-' 'A-Z_' <<< "$setting")=$value")
    for token in $value; do
        case "$setting" in
            # A PEP 503 file index (…/simple) links its files relative to its parent folder.
            index-url|extra-index-url) if [[ "$token" == file://* ]]; then mount_local "$(dirname "${token%/}")"; fi ;;
            find-links) mount_local "$token" ;;
        esac
    done
done
ca="${CA_BUNDLE:-${PIP_CERT:-$("$venv_python" -m pip config get global.cert 2>/dev/null || true)}}"
[[ -n "$ca" ]] || ca=/etc/ssl/certs/ca-certificates.crt
secret_args=()
if [[ -f "$ca" ]]; then
    secret_args=(--secret "id=ca_bundle,src=$ca")
    log "CA bundle for package downloads (build secret): $ca"
elif [[ -n "${CA_BUNDLE:-}" ]]; then
    die "CA_BUNDLE=$CA_BUNDLE is not a file"
fi
if [[ "$target" == runtime ]]; then
    # CPU onnxruntime, pinned by requirements/constraints.txt like .venv: bitwise-comparable output.
    build_args+=(--build-arg ORT_PACKAGE=onnxruntime --build-arg TRT_PACKAGE=)
else
    build_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
fi

# ---- build -------------------------------------------------------------------------------------
log "building target $target on $base (buildah, chroot isolation, $driver storage)"
start=$(date +%s)
if ! "${B[@]}" bud --isolation chroot --pull-never --format docker --layers "${no_cache[@]}" \
        -f Dockerfile --target "$target" "${build_args[@]}" "${secret_args[@]}" "${volumes[@]}" \
        -t "$image" . > >(tee "$work/build.log" | grep --line-buffered -E '^(\[[0-9]+/[0-9]+\] )?(STEP|COMMIT)|^(onnxruntime|torch) ' >&2) 2>&1
then
    sleep 1; tail -30 "$work/build.log" >&2; die "build of target $target failed (log above)"
fi
build_s=$(( $(date +%s) - start ))
size_bytes="$("${P[@]}" image inspect --format '{{.Size}}' "$image")"
size_mb=$(( size_bytes / 1000000 ))

# ---- what the image contains -------------------------------------------------------------------
ctr="$("${B[@]}" from --pull-never --name "brainldm-check-$target-$$" "$image")"
containers+=("$ctr")
mnt="$("${B[@]}" mount "$ctr")"
scan_secret=()
if [[ -f "$ca" ]]; then scan_secret=(--secret-file "$ca"); fi
status=0
"$venv_python" scripts/container_tools.py scan-rootfs "$mnt" --target "$target" "${scan_secret[@]}" \
    > "$work/scan-rootfs.json" || status=1
"${P[@]}" save --format oci-dir -o "$work/oci" "$image" >/dev/null
"$venv_python" scripts/container_tools.py scan-layers "$work/oci" "${scan_secret[@]}" > "$work/scan-layers.json" \
    || status=1
rm -rf "$work/oci"
user="$("${B[@]}" run --isolation chroot "$ctr" -- id -u)"
[[ "$user" != 0 ]] || { log "the image runs as root"; status=1; }
mapfile -t entrypoint < <("${P[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$image" \
    | "$venv_python" -c 'import json, sys; print("\n".join(json.load(sys.stdin) or []))')

if [[ "$target" == runtime ]]; then
    # ---- the runtime image's reconstruction vs the host runtime's --------------------------
    [[ "${entrypoint[*]}" == brainldm-runtime ]] || { log "entrypoint is '${entrypoint[*]}'"; status=1; }
    bundle="$root_dir/bundles/sim-nsd-ours"
    [[ -f "$bundle/manifest.json" ]] || die "default bundle $bundle missing (dvc pull / dvc repro export)"
    "$venv_python" scripts/container_tools.py betas --prepared data/prepared/sim-nsd.h5 --images 4 \
        --out "$work/in/betas.npz" > "$work/betas.json"
    args=(reconstruct --betas /input/betas.npz --bundle /input/bundle --seed 42 --threads 2 --batch-size 8)
    log "host runtime: .venv/bin/brainldm-runtime ${args[*]}"
    t0=$(date +%s)
    "$root_dir/.venv/bin/brainldm-runtime" reconstruct --bundle "$bundle" --betas "$work/in/betas.npz" \
        --out "$work/host" --seed 42 --threads 2 --batch-size 8 > "$work/host.log" 2>&1 \
        || { cat "$work/host.log" >&2; die "host runtime failed"; }
    host_s=$(( $(date +%s) - t0 ))
    log "container: buildah run --isolation chroot $image: ${entrypoint[*]} ${args[*]}"
    t0=$(date +%s)
    "${B[@]}" run --isolation chroot -v "$bundle:/input/bundle:ro" -v "$work/in/betas.npz:/input/betas.npz:ro" \
        "$ctr" -- "${entrypoint[@]}" "${args[@]}" --out /tmp/out > "$work/container.log" 2>&1 \
        || { cat "$work/container.log" >&2; die "the image's entrypoint failed"; }
    container_s=$(( $(date +%s) - t0 ))
    cp -R "$mnt/tmp/out" "$work/container"
    "$venv_python" scripts/container_tools.py compare "$work/host" "$work/container" > "$work/compare.json" \
        || status=1
    ort_host="$("$venv_python" -c 'import onnxruntime; print(onnxruntime.__version__)')"
    ort_image="$("${B[@]}" run --isolation chroot "$ctr" -- python -c 'import onnxruntime; print(onnxruntime.__version__)')"
else
    # ---- the artifact image: its tools and packages load ------------------------------------
    [[ -z "${entrypoint[*]}" ]] || { log "artifact entrypoint is '${entrypoint[*]}' (expected none)"; status=1; }
    dvc_version="$("${B[@]}" run --isolation chroot "$ctr" -- dvc --version)"
    imports="$("${B[@]}" run --isolation chroot "$ctr" -- python -c \
        'import torch, diffusers, onnxruntime, brainldm.train.data.prepare, brainldm.export.export, brainldm.runtime.cli; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, onnxruntime {onnxruntime.__version__}")')"
    if (( run_pipeline )); then
        cmd_json="$("${P[@]}" image inspect --format '{{json .Config.Cmd}}' "$image")"
        mapfile -t cmd < <("$venv_python" -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "$cmd_json")
        log "container: ${cmd[*]} ${pipeline_args[*]}"
        t0=$(date +%s)
        if ! "${B[@]}" run --isolation chroot "$ctr" -- "${cmd[@]}" "${pipeline_args[@]}" 2>&1 | tee "$work/pipeline.log" >&2
        then
            log "the default command failed"; status=1
        fi
        pipeline_s=$(( $(date +%s) - t0 ))
    fi
fi

# ---- report --------------------------------------------------------------------------------------
echo "== container check: target $target ($image on $base)"
echo "build: ${build_s} s (buildah bud --isolation chroot, $driver, layer cache ${no_cache[*]:-on})"
echo "image size: ${size_mb} MB (${size_bytes} bytes)"
echo "runs as uid: $user"
echo "contents (rootfs): $("$venv_python" scripts/container_tools.py summary "$work/scan-rootfs.json")"
echo "layers: $("$venv_python" scripts/container_tools.py summary "$work/scan-layers.json")"
if [[ "$target" == runtime ]]; then
    echo "input: $("$venv_python" scripts/container_tools.py summary "$work/betas.json") (bundles/sim-nsd-ours, seed 42)"
    echo "onnxruntime: host $ort_host, image $ort_image; host run ${host_s} s, container run ${container_s} s"
    echo "comparison: $("$venv_python" scripts/container_tools.py summary "$work/compare.json")"
else
    echo "dvc --version: $dvc_version"
    echo "imports: $imports"
    if (( run_pipeline )); then echo "default command (dvc repro ${pipeline_args[*]:-<all>}): ${pipeline_s} s"; fi
fi
if (( status )); then
    echo "RESULT: FAILED (details in the lines above)"
    exit 1
fi
echo "RESULT: OK"
