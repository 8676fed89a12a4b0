#!/usr/bin/env bash
# `make images`: builds Dockerfile.operator and Dockerfile.trainer with the container engine this host has.
#   docker, when its engine answers; else podman with images/containers.conf (runc, no ulimit raise).
# Where no registry answers, the base is a local Python image made from Debian packages (images/debian-base.sh).
# The host's pip configuration (indexes, find-links, constraints, CA bundle) is given to pip inside the build, and
# with podman the local directories it names are mounted read-only, so the build installs what `make setup` does.
# Environment: ENGINE, REGISTRY and TAG (dev) naming them (engine.sh's image_ref), BASE_IMAGE, TORCH_VERSION,
# TORCH_VARIANT (cpu, or cuNNN such as cu126) and TORCH_INDEX_URL (unset: PyTorch's index for that variant; set and
# empty: the index pip is configured with, as `make setup`), IMAGES (operator trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
source images/engine.sh

TAG=${TAG:-dev}
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
[[ $TORCH_VARIANT =~ ^(cpu|cu[0-9]+)$ ]] || { echo "TORCH_VARIANT must be cpu or cuNNN (e.g. cu126), not '$TORCH_VARIANT'" >&2; exit 1; }
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/$TORCH_VARIANT}
REGISTRY_BASE=python:3.11-slim-bookworm
LOCAL_BASE=localhost/wmtp-python:3.11-bookworm

if [ -z "${BASE_IMAGE:-}" ]; then
  if image_exists "$REGISTRY_BASE" || timeout 120 "$ENGINE" pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
    BASE_IMAGE=$REGISTRY_BASE
  else
    echo "no registry answers for $REGISTRY_BASE: using a local Debian base"
    bash images/debian-base.sh "$ENGINE" "$LOCAL_BASE"
    BASE_IMAGE=$LOCAL_BASE
  fi
fi

# pip's effective configuration on this host, as a pip.conf for the build (a secret: never stored in a layer).
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
mounts=()
python3 images/pip_config.py "$workdir/pip.conf" "$ENGINE" > "$workdir/mounts"
while read -r path; do [ -n "$path" ] && mounts+=(-v "$path:$path:ro"); done < "$workdir/mounts"

build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${TORCH_VERSION:-}" ] && build_args+=(--build-arg "TORCH_VERSION=$TORCH_VERSION")
build_args+=(--build-arg "TORCH_VARIANT=$TORCH_VARIANT" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
engine_args=(--secret "id=pip.conf,src=$workdir/pip.conf")
if [ "$ENGINE" = docker ]; then
  export DOCKER_BUILDKIT=1  # cache and secret mounts need BuildKit (the default from Docker 23)
else
  # Local images only (--pull=never), the host's network (pip reaches what the host reaches), layer cache kept.
  engine_args+=(--pull=never --network host --layers "${mounts[@]}")
fi

for image in $IMAGES; do
  start=$SECONDS
  "$ENGINE" build "${engine_args[@]}" "${build_args[@]}" -f "Dockerfile.$image" -t "$(image_ref "$image")" .
  echo "built $(image_ref "$image") from $BASE_IMAGE in $((SECONDS - start)) s"
done
