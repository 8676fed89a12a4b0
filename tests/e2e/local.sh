#!/usr/bin/env bash
# `make e2e-local`: both images built, then the container tests (tests/e2e) with podman playing the pods.
# Exit 77 (skipped) where podman is missing or cannot run containers here, saying why.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}

skip() { echo "SKIPPED: $*"; exit 77; }
command -v podman >/dev/null || skip "podman is not installed (as root: apt-get install -y podman runc debootstrap)"
export ENGINE=podman  # the test kubelet runs pods with `podman kube play`
source images/engine.sh
info=$(podman info 2>&1) || skip "podman does not work here: $(tail -1 <<<"$info")"

# The trainer's torch as `make setup` installed it: from the index pip is configured with, and of the same build
# (Dockerfile.trainer checks TORCH_VARIANT), so the story needs no index beyond the host's.
export TORCH_INDEX_URL=${TORCH_INDEX_URL-}
TORCH_VARIANT=${TORCH_VARIANT:-$("$BIN/python" -c "import torch; v = torch.version.cuda; print('cu' + v.replace('.', '') if v else 'cpu')")}
export TORCH_VARIANT
start=$SECONDS
bash images/build.sh
echo "images ready in $((SECONDS - start)) s"
export WMTP_E2E_TRAINER_IMAGE WMTP_E2E_OPERATOR_IMAGE
WMTP_E2E_TRAINER_IMAGE=$(image_ref trainer) WMTP_E2E_OPERATOR_IMAGE=$(image_ref operator)
start=$SECONDS
"$BIN/pytest" -q tests/e2e --ignore=tests/e2e/test_kind.py "$@"
echo "container tests passed in $((SECONDS - start)) s"
