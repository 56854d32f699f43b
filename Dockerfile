# syntax=docker/dockerfile:1
# Minimal first version (issue 8 finishes it: CUDA base, artifact target, non-root, labels).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS runtime
WORKDIR /opt/brainldm
COPY pyproject.toml README.md ./
COPY train/ train/
COPY export/ export/
COPY runtime/ runtime/
RUN pip install --no-cache-dir .
ENTRYPOINT ["brainldm-runtime"]
