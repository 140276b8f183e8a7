#!/usr/bin/env bash
# Stop the cluster that scripts/cluster-up.sh started (its real node first,
# while the apiserver can still delete the node's pods) and drop its state
# (etcd data, logs); certificates, the cached binaries and the node's imported
# images stay. Only processes named by PID files under CLUSTER_DIR are stopped.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"  # sets ROOT, the repository

if ! CLUSTER_DIR="$CLUSTER_DIR" bash "$ROOT/scripts/node-down.sh"; then
  echo "[cluster-down] the node did not stop cleanly; its PID files stay in $RUN" >&2
  node_left=1
fi

# Reverse start order, so that nothing logs errors about what went first.
for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  stop "$name"
done
rm -rf "$CLUSTER_DIR/etcd"
[ -n "${node_left:-}" ] || rm -rf "$CLUSTER_DIR/logs" "$RUN"
echo "[cluster-down] stopped" >&2
