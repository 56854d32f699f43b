# syntax=docker/dockerfile:1.7
# brainldm images (README "Docker"):
#   --target runtime    slim: the lean runtime (numpy, onnxruntime, Pillow, h5py, tqdm) and its GPU
#                       backends (onnxruntime-gpu: ort-cuda, ort-trt; TensorRT: tensorrt). No torch.
#                       ENTRYPOINT brainldm-runtime.
#   --target artifact   full paper artifact: the training/evaluation pipeline (torch CPU, diffusers,
#                       dvc, ...), the pipeline definition and the embedded DVC remote. The default
#                       command reproduces the default pipeline and prints `dvc metrics show`.
# Build arguments:
#   BASE_IMAGE          any Debian/Ubuntu image with python3.11 in its apt sources (Debian 12,
#                       Ubuntu 22.04); default: a pinned CUDA 13 + cuDNN 9 runtime image.
#   ORT_PACKAGE         onnxruntime flavour of the runtime image (default the GPU build; pass
#                       ORT_PACKAGE=onnxruntime TRT_PACKAGE= for a CPU-only image).
#   TRT_PACKAGE         TensorRT Python package for the `tensorrt` and `ort-trt` backends.
#   TRT_INDEX_URL       where TensorRT's wheels live (PyPI only has placeholders that fetch them
#                       from there at install time); used only when TRT_PACKAGE is set.
#   TORCH_PACKAGE       the artifact's torch build (default the CPU build of the pinned 2.13.0;
#                       e.g. torch==2.13.0+cu130 with TORCH_INDEX_URL=.../whl/cu130 for CUDA).
#   TORCH_INDEX_URL     extra index holding TORCH_PACKAGE (empty = none).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST   package mirrors.
# A custom CA bundle (package downloads behind a TLS-intercepting proxy) is passed as a build
# secret, never as a file or build argument, so it is in no layer:
#   docker build --secret id=ca_bundle,src=/path/to/ca.crt ...
# Every Python package version comes from requirements/constraints.txt (the versions the project
# is tested with) or from the pinned build arguments above.

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------
# python: the base image + the distribution's Python 3.11 + an unprivileged user. No compilers.
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
# (hadolint forgets SHELL at the next ARG and at FROM: stages whose RUN uses bash set it after their ARGs.)
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution package versions follow the (pinned) base image and its suite.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca_bundle,required=false \
    apt_ca=(); if [[ -s /run/secrets/ca_bundle ]]; then apt_ca=(-o Acquire::https::CAInfo=/run/secrets/ca_bundle); fi \
 && apt-get "${apt_ca[@]}" update \
 && apt-get "${apt_ca[@]}" install -y --no-install-recommends python3.11 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 1000 brainldm \
 && useradd --uid 1000 --gid brainldm --create-home --shell /bin/bash brainldm \
 && install -d -o brainldm -g brainldm /workspace
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# ---------------------------------------------------------------------------------------------
# build-base: python3.11-venv and a throwaway tool venv with pinned pip/setuptools/wheel. The
# final images' venvs are created --without-pip and filled by this pip (pip --python).
FROM python AS build-base
ARG DEBIAN_FRONTEND=noninteractive
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
ARG WHEEL_VERSION=0.48.0
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca_bundle,required=false \
    apt_ca=(); if [[ -s /run/secrets/ca_bundle ]]; then apt_ca=(-o Acquire::https::CAInfo=/run/secrets/ca_bundle); export PIP_CERT=/run/secrets/ca_bundle; fi \
 && apt-get "${apt_ca[@]}" update \
 && apt-get "${apt_ca[@]}" install -y --no-install-recommends python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" "wheel==${WHEEL_VERSION}"

# build-wheel: the brainldm wheel, built without network from the sources only.
FROM build-base AS build-wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/
COPY train/ train/
COPY export/ export/
COPY runtime/ runtime/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation -w /opt/dist /src

# build-runtime: /opt/venv with the lean runtime only (base dependencies, the chosen onnxruntime
# flavour instead of the CPU one, TensorRT), no pip, no torch, no train/export code.
FROM build-base AS build-runtime
# (build arguments are per stage: the mirrors are declared again wherever pip runs)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG ORT_PACKAGE=onnxruntime-gpu==1.31.1
ARG TRT_PACKAGE=tensorrt-cu13==10.16.1.11
ARG TRT_INDEX_URL=https://pypi.nvidia.com
COPY --from=build-wheel /opt/dist/ /opt/dist/
COPY pyproject.toml requirements/constraints.txt /src/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [[ -s /run/secrets/ca_bundle ]]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && if [[ -n "${TRT_PACKAGE}" && -n "${TRT_INDEX_URL}" ]]; then export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+${PIP_EXTRA_INDEX_URL} }${TRT_INDEX_URL}"; fi \
 && read -ra base_deps <<< "$(python3.11 -c 'import tomllib; deps = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]; print(" ".join(d for d in deps if not d.startswith("onnxruntime")))')" \
 && python3.11 -m venv --without-pip /opt/venv \
 && pip=(/opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir -c /src/constraints.txt) \
 && "${pip[@]}" --no-deps /opt/dist/brainldm-*.whl \
 && "${pip[@]}" "${base_deps[@]}" "${ORT_PACKAGE}" ${TRT_PACKAGE:+"${TRT_PACKAGE}"} \
 && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "${site}/brainldm/train" "${site}/brainldm/export" \
 && /opt/venv/bin/brainldm-runtime --help > /dev/null \
 && /opt/venv/bin/python -c 'import importlib.util as u, onnxruntime, brainldm.runtime.reconstructor; assert u.find_spec("torch") is None, "torch in the runtime image"; print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())'

# build-artifact: /opt/venv with brainldm[train] (torch CPU build, diffusers, dvc, ...).
FROM build-base AS build-artifact
# (build arguments are per stage: the mirrors are declared again wherever pip runs)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG TORCH_PACKAGE=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=build-wheel /opt/dist/ /opt/dist/
COPY requirements/constraints.txt /src/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [[ -s /run/secrets/ca_bundle ]]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && if [[ -n "${TORCH_INDEX_URL}" ]]; then export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+${PIP_EXTRA_INDEX_URL} }${TORCH_INDEX_URL}"; fi \
 && python3.11 -m venv --without-pip /opt/venv \
 && wheel="$(echo /opt/dist/brainldm-*.whl)" \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir -c /src/constraints.txt "${wheel}[train]" "${TORCH_PACKAGE}" \
 && /opt/venv/bin/dvc --version > /dev/null \
 && torch_version="$(/opt/venv/bin/python -c 'import torch, diffusers, brainldm.train.data.prepare, brainldm.export.export; print(torch.__version__)')" \
 && echo "torch ${torch_version}" \
 && [[ "torch==${torch_version}" == "${TORCH_PACKAGE}" ]]

# ---------------------------------------------------------------------------------------------
# runtime: slim image, ENTRYPOINT brainldm-runtime (README "Docker").
FROM python AS runtime
ARG BASE_IMAGE
ARG ORT_PACKAGE=onnxruntime-gpu==1.31.1
ARG TRT_PACKAGE=tensorrt-cu13==10.16.1.11
LABEL org.opencontainers.image.title="brainldm-runtime" \
      org.opencontainers.image.description="Lean brainldm runtime: fMRI betas + exported bundle -> reconstructed images (ONNX Runtime / TensorRT, no torch)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.brainldm.onnxruntime="${ORT_PACKAGE}" \
      io.brainldm.tensorrt="${TRT_PACKAGE}"
COPY --from=build-runtime /opt/venv/ /opt/venv/
# tensorrt_libs: libnvinfer for onnxruntime's TensorRT provider (absent in a CPU-only build).
ENV PATH=/opt/venv/bin:${PATH} \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/tensorrt_libs${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["brainldm-runtime"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# artifact: the full paper artifact. The project (code, params.yaml, dvc.yaml, dvc.lock,
# data.dvc, the embedded DVC remote) is read-only in /opt/brainldm; the default command copies
# it into /workspace (mount a volume there to keep the outputs), pulls the simulated data and
# the small LDM from the embedded remote, runs `dvc repro` and prints `dvc metrics show`.
FROM python AS artifact
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="brainldm-artifact" \
      org.opencontainers.image.description="brainldm paper artifact: the DVC pipeline (simulated subject, decoders, latent diffusion reconstruction, evaluation, export, runtime parity, report)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
COPY --from=build-artifact /opt/venv/ /opt/venv/
COPY . /opt/brainldm/
ENV PATH=/opt/venv/bin:${PATH} \
    BRAINLDM_HOME=/opt/brainldm \
    BRAINLDM_WORKSPACE=/workspace \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    DVC_NO_ANALYTICS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 1000:1000
WORKDIR /workspace
CMD ["/opt/brainldm/scripts/artifact_reproduce.sh"]
