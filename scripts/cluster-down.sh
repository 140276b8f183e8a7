#!/usr/bin/env bash
# Stop the control plane that scripts/cluster-up.sh started and drop its
# state (etcd data, logs); certificates and the cached binaries stay.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CLUSTER_DIR="${CLUSTER_DIR:-$ROOT/.cluster}"
RUN="$CLUSTER_DIR/run"

# Reverse start order, so that nothing logs errors about what went first.
for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pidfile="$RUN/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
done
rm -rf "$CLUSTER_DIR/etcd" "$CLUSTER_DIR/logs" "$RUN"
echo "[cluster-down] stopped" >&2
