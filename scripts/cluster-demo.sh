#!/usr/bin/env bash
# `make cluster`: a real one-node Kubernetes cluster on this machine to try
# ChatStream by hand. No fake nodes and no taint, so every pod lands on the
# real node. Builds the images (incremental), imports them into the node's
# containerd (only when changed), installs the chart (the operator runs as a
# pod), applies manifests/examples/cpu-builtin.yaml with a CPU request this
# machine can grant (DEMO_CPU, default 250m) with its traces going to a Jaeger
# v2 in the namespace observability (DEMO_TRACES=0: none), waits until it is
# Ready and prints how to reach the chat page and the traces.
# `make cluster-down` stops it all.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"  # sets ROOT, the repository
export KUBECONFIG="$CLUSTER_DIR/kubeconfig" PATH="$BIN:$PATH"
CPU="${DEMO_CPU:-250m}"
TRACES="${DEMO_TRACES:-1}"

CHATSTREAM_FAKE_NODES=0 "$ROOT/scripts/cluster-up.sh"
kubectl get node chatstream-node >/dev/null 2>&1 || { say "no real node came up; see $CLUSTER_DIR/logs"; exit 1; }
bash "$ROOT/scripts/build-images.sh"
"$ROOT/scripts/node-up.sh" import localhost/chatstream-operator:0.1.0 localhost/chatstream:0.1.0 \
  localhost/chatstream-router:0.1.0
say "helm install chatstream (the operator runs as a pod)"
helm upgrade --install chatstream "$ROOT/charts/chatstream" --namespace chatstream-system \
  --create-namespace --wait --timeout 180s >/dev/null
kubectl wait --for=condition=Established crd/chatstreamdeployments.chatstream.io --timeout=60s >/dev/null
tracing=""
if [ "$TRACES" = 1 ]; then
  say "Jaeger v2 in the namespace observability (manifests/tracing/jaeger.yaml)"
  "$ROOT/scripts/trace-backend.sh" import
  kubectl create namespace observability --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -n observability -f "$ROOT/manifests/tracing/jaeger.yaml" >/dev/null
  tracing='{"spec":{"tracing":{"otlpEndpoint":"http://jaeger.observability:4318","samplingRatio":1}}}'
fi
say "kubectl apply -f manifests/examples/cpu-builtin.yaml (CPU request $CPU)"
sed "s/requests: {cpu: \"2\"/requests: {cpu: \"$CPU\"/" "$ROOT/manifests/examples/cpu-builtin.yaml" |
  kubectl apply -n default -f -
[ -z "$tracing" ] || kubectl patch -n default csd smollm2-cpu --type merge -p "$tracing" >/dev/null
kubectl wait -n default --for=condition=Ready csd/smollm2-cpu --timeout=600s >/dev/null
kubectl wait -n default --for=condition=RouterReady csd/smollm2-cpu --timeout=120s >/dev/null
kubectl get -n default csd smollm2-cpu
cat >&2 <<EOF

The chat page, from this machine:
  export KUBECONFIG=$KUBECONFIG PATH=$BIN:\$PATH
  kubectl port-forward -n default svc/smollm2-cpu-router 8000:8000
  then open http://127.0.0.1:8000/   (its own recent traces: http://127.0.0.1:8000/traces)
  (svc/smollm2-cpu-router keeps each conversation on one pod; svc/smollm2-cpu is the plain Service)
EOF
[ "$TRACES" = 1 ] && cat >&2 <<EOF
The traces in Jaeger (query API; this build of Jaeger has no web UI):
  kubectl port-forward -n observability svc/jaeger 16686:16686
  curl -s 'http://127.0.0.1:16686/api/traces?service=smollm2-cpu&limit=5'
EOF
cat >&2 <<EOF
Stop it all with: make cluster-down
EOF
