#!/usr/bin/env bash
# Builds the image's base (Debian bookworm with Python 3.11, venv and tini) from Debian's own
# package mirror with debootstrap, and imports it into podman as $1 (default
# localhost/switchboard-base:bookworm). For machines that reach Debian's mirror but no
# container registry; elsewhere the Dockerfile's default base (python:3.12-slim-bookworm) is used.
set -euo pipefail
IMAGE=${1:-localhost/switchboard-base:bookworm}
PODMAN=${PODMAN:-podman --storage-driver vfs}
if $PODMAN image exists "$IMAGE"; then exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,tini,ca-certificates \
  bookworm "$WORK/root" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
rm -rf "$WORK/root/var/cache/apt/archives"/*.deb "$WORK/root/var/lib/apt/lists"/*
tar -C "$WORK/root" -c . | $PODMAN import - "$IMAGE" >/dev/null
echo "$IMAGE"
