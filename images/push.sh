#!/usr/bin/env bash
# `make push`: pushes the images `make images` tagged, $REGISTRY/wmtp-<name>:$TAG (engine.sh's image_ref), with
# the same engine (docker, else podman). Log in to the registry first (docker login / podman login).
# Environment: ENGINE, REGISTRY, TAG, IMAGES (operator trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
source images/engine.sh

[ -n "${REGISTRY:-}" ] || { echo "REGISTRY is empty: name the registry to push to (make push REGISTRY=registry.example.com/team)" >&2; exit 1; }
for image in $IMAGES; do
  "$ENGINE" push "$(image_ref "$image")"
done
