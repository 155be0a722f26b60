#!/usr/bin/env bash
# Builds deploy/Dockerfile with podman on a machine without a container registry or Docker engine
# (deploy/README.md, "Image"): the base comes from Debian's mirror (deploy/local-base.sh), layers in
# vfs storage, runc as the runtime, and lowered rlimits (an unprivileged sandbox may not raise them).
# On a normal Docker host: docker build -f deploy/Dockerfile -t switchboard .
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-localhost/switchboard:dev}
BASE=${BASE:-localhost/switchboard-base:bookworm}
export PODMAN="podman --storage-driver vfs --runtime runc"
deploy/local-base.sh "$BASE" >/dev/null
# PIP_CA: the CA bundle pip trusts here (a proxy between this machine and PyPI may re-sign TLS).
# --format docker: the OCI image format has no HEALTHCHECK, and podman drops it from OCI builds.
$PODMAN build --format docker --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --secret id=pip-ca,src="${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}" \
  --build-arg BASE_IMAGE="$BASE" -f deploy/Dockerfile -t "$TAG" .
