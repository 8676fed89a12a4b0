# Sourced by the image and e2e scripts: picks the container engine and names the project's images.
# ENGINE=docker|podman forces one; otherwise docker when its engine answers, else podman (with this folder's
# containers.conf, exported as CONTAINERS_CONF so that every podman call, the tests' too, uses it).
_images_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else echo "no container engine: install docker, or podman and runc (apt-get install -y podman runc debootstrap)" >&2; exit 1
  fi
fi
if [ "$ENGINE" = podman ]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$_images_dir/containers.conf}
fi
export ENGINE

# The images, each built from Dockerfile.<name>.
IMAGES=${IMAGES:-operator trainer}

image_ref() {  # image_ref operator|trainer: the reference `make images` tags, $REGISTRY/wmtp-<name>:$TAG
  local prefix=""  # no REGISTRY (the e2e stories): a local name, podman's under localhost/
  if [ -n "${REGISTRY:-}" ]; then prefix="$REGISTRY/"
  elif [ "$ENGINE" = podman ]; then prefix=localhost/
  fi
  echo "${prefix}wmtp-$1:${TAG:-dev}"
}

image_exists() {
  "$ENGINE" image inspect "$1" >/dev/null 2>&1
}
