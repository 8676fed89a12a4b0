#!/usr/bin/env bash
# `make e2e-kind`: the WMTPRun story of tests/e2e/test_story.py on a real kind cluster. This script sets the
# stage: builds both images (images/build.sh, docker) and loads them into kind, runs S3 (moto) inside the cluster,
# installs the chart (with its MLflow server), and forwards both services to this host;
# the story itself (apply, preempt, kill, resume, succeed, and every assertion) is the same test `make e2e-local`
# runs, with support.clusters.KindCluster instead of the emulator and the test node.
# Exit 77 (skipped) where Docker or kind is missing; tests/e2e/test_kind.py wraps it.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
CLUSTER=${CLUSTER:-wmtp-e2e}
NS=wmtp-e2e

skip() { echo "SKIPPED: $*"; exit 77; }
command -v docker >/dev/null || skip "Docker is not installed (kind runs Kubernetes nodes as Docker containers)"
docker info >/dev/null 2>&1 || skip "the Docker engine is not reachable (docker info failed)"
command -v kind >/dev/null || skip "kind is not installed (https://kind.sigs.k8s.io)"
KUBECTL="$BIN/kubectl"; HELM="$BIN/helm"
log() { echo "[e2e $(date +%H:%M:%S)] $*"; }

if ! kind get clusters | grep -qx "$CLUSTER"; then kind create cluster --name "$CLUSTER" --wait 120s; fi
cleanup() { kill "${FORWARDS[@]}" 2>/dev/null || true; [ -n "${KEEP_CLUSTER:-}" ] || kind delete cluster --name "$CLUSTER"; }
FORWARDS=()
trap cleanup EXIT
"$KUBECTL" config use-context "kind-$CLUSTER"

log "building images"
export ENGINE=docker TAG=e2e TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
source images/engine.sh
bash images/build.sh
TRAINER=$(image_ref trainer) OPERATOR=$(image_ref operator)
kind load docker-image --name "$CLUSTER" "$OPERATOR" "$TRAINER"

log "S3 in the cluster"
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n "$NS" create deployment s3 --image=motoserver/moto:5.0.28 --port=5000 --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n "$NS" expose deployment s3 --port=9000 --target-port=5000 --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n "$NS" rollout status deployment/s3 --timeout=300s

log "installing the chart"
"$HELM" upgrade --install wmtp charts/wmtp --namespace "$NS" --wait --timeout 300s \
  --set image.repository="${OPERATOR%:*}" --set image.tag=e2e --set image.pullPolicy=Never \
  --set watch.clusterWide=false --set "watch.namespaces={$NS}"
"$HELM" test wmtp --namespace "$NS"
MLFLOW=wmtp-mlflow  # the chart's MLflow server (mlflow.enabled)

"$KUBECTL" -n "$NS" port-forward service/s3 19000:9000 >/dev/null 2>&1 & FORWARDS+=($!)
"$KUBECTL" -n "$NS" port-forward "service/$MLFLOW" 15000:5000 >/dev/null 2>&1 & FORWARDS+=($!)
sleep 3

log "an MLflow user and Secret for the run's namespace (docs/operator.md, MLflow users)"
admin() { "$KUBECTL" -n "$NS" get secret "$MLFLOW-auth" -o "jsonpath={.data.$1}" | base64 -d; }
export MLFLOW_TRACKING_USERNAME; MLFLOW_TRACKING_USERNAME=$(admin MLFLOW_TRACKING_USERNAME)  # the story reads every run
export MLFLOW_TRACKING_PASSWORD; MLFLOW_TRACKING_PASSWORD=$(admin MLFLOW_TRACKING_PASSWORD)
RUN_PASSWORD=$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
RUN_PASSWORD=$RUN_PASSWORD "$BIN/python" - "$NS" <<'PY'
import base64, json, os, sys, urllib.error, urllib.request
user, password = sys.argv[1], os.environ["RUN_PASSWORD"]
login = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
headers = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode(), "Content-Type": "application/json"}
body = json.dumps({"username": user, "password": password}).encode()
try:  # a kept cluster has the user already: give it the new password
    urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:15000/api/2.0/mlflow/users/create", body, headers))
except urllib.error.HTTPError:
    update = urllib.request.Request("http://127.0.0.1:15000/api/2.0/mlflow/users/update-password", body, headers,
                                    method="PATCH")
    urllib.request.urlopen(update)
PY
"$KUBECTL" -n "$NS" create secret generic wmtp-mlflow --from-literal=MLFLOW_TRACKING_USERNAME="$NS" \
  --from-literal=MLFLOW_TRACKING_PASSWORD="$RUN_PASSWORD" --dry-run=client -o yaml | "$KUBECTL" apply -f -

log "the story"
export WMTP_E2E_CLUSTER=kind WMTP_E2E_NAMESPACE=$NS KUBECTL WMTP_E2E_TRAINER_IMAGE=$TRAINER WMTP_E2E_OPERATOR_IMAGE=$OPERATOR
export WMTP_E2E_S3_URL="http://s3.$NS.svc:9000" WMTP_E2E_S3_LOCAL=http://127.0.0.1:19000
export WMTP_E2E_MLFLOW_URL="http://$MLFLOW.$NS.svc:5000" WMTP_E2E_MLFLOW_LOCAL=http://127.0.0.1:15000
export AWS_ACCESS_KEY_ID=e2e AWS_SECRET_ACCESS_KEY=e2e AWS_DEFAULT_REGION=us-east-1
"$BIN/pytest" -q tests/e2e/test_story.py
log "PASSED"
