#!/usr/bin/env bash
# A local Python base image made from Debian packages, for hosts that reach Debian's mirror but no container
# registry: debootstrap a minimal bookworm (python3 3.11, venv, CA certificates) and import it as an image.
# Usage: debian-base.sh ENGINE IMAGE. Cached: an existing IMAGE is kept (delete it to rebuild).
set -euo pipefail
ENGINE=$1 IMAGE=$2
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm  # python3 is 3.11 there, the version the torch wheels and the venv are built for

if "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: cached"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "no registry and no debootstrap: apt-get install debootstrap, or pass BASE_IMAGE=<a python 3.11 image you have>" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root to make the base image $IMAGE" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base image $IMAGE: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: imported"
